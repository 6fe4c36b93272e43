"""Ultralytics 8.x integration: their trainer runs our ModelEMA, and ``BaseModel.fuse`` folds with our batched op.

One call, before the ``YOLO(...)`` object is made::

    from torchutils_ext.ultralytics import enable_for_ultralytics
    enable_for_ultralytics(skip_nonfinite=True)
    YOLO('yolo11n.yaml').train(data=..., epochs=...)

What it changes, in this process and in every DDP worker:

- EMA: ``ultralytics.engine.trainer.ModelEMA``, the one name through which the trainer builds its EMA (in
  ``_setup_train``, and again in ``_load_checkpoint_state`` on resume and NaN recovery), becomes
  ``UltralyticsEMA``: our fused update in mode 'lerp' (their ``_foreach_lerp_``'s bits) with
  their contract (``unwrap_model``, ``teacher_model`` stripped, ``enabled``, ``update_attr(model, include=...)``).
  A callback that swapped ``trainer.ema`` once would be undone by the next rebuild; the name is not.
- Workers: Ultralytics' DDP rebuilds the trainer in fresh processes from a pickle of its class, arguments, model
  and callbacks, so a patch made in the parent is absent there. The integration is an
  ``on_pretrain_routine_end`` callback registered in Ultralytics' default callbacks, which every ``YOLO`` object
  made afterwards copies and which travels with those callbacks: in each process it applies the patch (for the
  later rebuilds) and converts an EMA that the trainer built before it (a worker's first one).
- Fusing: ``BaseModel.fuse`` (used by ``Model.fuse``, ``AutoBackend``, the exporter) picks the same pairs as
  Ultralytics 8.4's and folds every plain Conv/ConvTranspose + BN pair in one batched in-place call
  (``_ultralytics_fuse``).

Everything else stays theirs: training loop, checkpoints (the EMA module is saved exactly as theirs is), the
save-time NaN repair, validation. The hooks are checked first; on an Ultralytics whose hooks changed, enabling
raises RuntimeError instead of patching something it no longer understands.
"""
from __future__ import annotations

import inspect
import logging

from . import _ultralytics_fuse
from .ema import ModelEMA
from .training import copy_attr

__all__ = ['UltralyticsEMA', 'enable_for_ultralytics', 'disable_for_ultralytics', 'TESTED_VERSION']

TESTED_VERSION = '8.4.190'  # the version CI installs (.ci/run) and the README names
_LOG = logging.getLogger('torchutils_ext')
_EVENT = 'on_pretrain_routine_end'  # runs in every rank, after the trainer built its EMA and loaded a resume
_REPORT_EVENT = 'on_train_epoch_end'
_saved = {}  # what the patches replaced: restored by disable_for_ultralytics
_warned = []  # the untested version already warned about


def _unwrap(model):
    from ultralytics.utils.torch_utils import unwrap_model  # torch.compile's _orig_mod and DP/DDP's .module
    return unwrap_model(model)


class UltralyticsEMA(ModelEMA):
    """Ultralytics' ``ModelEMA`` (8.x) on our fused update.

    Their contract: the model is unwrapped with their ``unwrap_model`` (``torch.compile``'s ``_orig_mod`` as well
    as DP/DDP), a ``teacher_model`` attribute of the copy is set to None (distillation), ``enabled=False`` makes
    ``update`` and ``update_attr`` do nothing, ``update_attr``'s ``exclude`` defaults to ``()``, and the update
    is a lerp, ``v += (1 - d) * (m - v)`` (``mode='lerp'``: their ``torch._foreach_lerp_`` in every bit).
    Ours on top: ``skip_nonfinite=True`` leaves the whole EMA untouched on a step where the model holds a NaN or
    Inf (``skipped`` counts them), where theirs would keep the NaN until ``save_model`` resyncs that tensor.
    """

    def __init__(self, model, decay=0.9999, tau=2000, updates=0, *, skip_nonfinite=False, mode='lerp'):
        super().__init__(_unwrap(model), decay, tau, updates, mode=mode, skip_nonfinite=skip_nonfinite)
        if hasattr(self.ema, 'teacher_model'):  # as theirs: no second copy of a distillation teacher
            self.ema.teacher_model = None
        self.enabled = True

    def update(self, model):
        if self.enabled:
            super().update(_unwrap(model))

    def update_attr(self, model, include=(), exclude=()):
        if self.enabled:
            copy_attr(self.ema, _unwrap(model), include, exclude)

    @classmethod
    def from_stock(cls, stock, **kwargs):
        """Ours, continuing an EMA the trainer built with another class (their ModelEMA in a DDP worker)."""
        new = cls(stock.ema, updates=stock.updates, **kwargs)
        new.enabled = getattr(stock, 'enabled', True)
        if any(new.decay(x) != stock.decay(x) for x in (1, 100, 10_000)):
            raise ValueError('torchutils_ext.ultralytics: the trainer built its EMA with a decay ramp other than '
                             "ModelEMA's default (decay=0.9999, tau=2000); it cannot be converted")
        return new


def _modules():
    try:
        import ultralytics
        from ultralytics.engine import trainer
        from ultralytics.nn import tasks
        from ultralytics.utils import callbacks, torch_utils
    except ImportError as e:
        raise ImportError(f'torchutils_ext.ultralytics needs the ultralytics package ({TESTED_VERSION} is '
                          f'tested): {e}') from e
    return ultralytics, trainer, tasks, callbacks, torch_utils


def _check_hooks(fuse):
    """The Ultralytics names the integration replaces, as it expects them; RuntimeError listing what changed."""
    ultralytics, trainer, tasks, callbacks, tu = _modules()
    problems = []
    stock = getattr(tu, 'ModelEMA', None)
    if stock is None or not hasattr(tu, 'unwrap_model'):
        problems.append('ultralytics.utils.torch_utils has no ModelEMA or unwrap_model')
    elif list(inspect.signature(stock.__init__).parameters) != ['self', 'model', 'decay', 'tau', 'updates']:
        problems.append(f'ModelEMA takes {inspect.signature(stock.__init__)}, not (model, decay, tau, updates)')
    current = getattr(trainer, 'ModelEMA', None)
    if current is not stock and 'ema' not in _saved:
        problems.append('ultralytics.engine.trainer.ModelEMA is not ultralytics.utils.torch_utils.ModelEMA '
                        '(another integration replaced it?)')
    for name in ('_setup_train', '_load_checkpoint_state'):
        fn = getattr(trainer.BaseTrainer, name, None)
        if fn is None or 'ModelEMA' not in fn.__code__.co_names:
            problems.append(f'BaseTrainer.{name} no longer builds the EMA through the module name ModelEMA')
    if not hasattr(callbacks, 'default_callbacks') or _EVENT not in callbacks.default_callbacks:
        problems.append(f'ultralytics.utils.callbacks has no default {_EVENT!r} callback list')
    if fuse:
        problems += _ultralytics_fuse.check(tasks, _saved.get('fuse'))
    if problems:
        raise RuntimeError(f'torchutils_ext.ultralytics: ultralytics {ultralytics.__version__} (tested: '
                           f'{TESTED_VERSION}) differs where the integration hooks in: ' + '; '.join(problems)
                           + ('. Pass fuse=False to keep their BaseModel.fuse' if fuse else ''))
    if ultralytics.__version__ != TESTED_VERSION and not _warned:
        _warned.append(ultralytics.__version__)  # once per process
        _LOG.warning('torchutils_ext.ultralytics: tested with ultralytics %s, running %s (its hooks check out)',
                     TESTED_VERSION, ultralytics.__version__)
    return trainer, tasks, callbacks


def _ema_factory(skip_nonfinite):
    def build(model, decay=0.9999, tau=2000, updates=0):  # their constructor's signature
        return UltralyticsEMA(model, decay, tau, updates, skip_nonfinite=skip_nonfinite)
    build.torchutils_ext = True
    return build


class Integration:
    """The settings of ``enable_for_ultralytics``, as an ``on_pretrain_routine_end`` callback: pickled with the
    trainer's callbacks into DDP workers, it applies the integration in whichever process runs it."""

    def __init__(self, skip_nonfinite=False, fuse=True):
        for name, flag in (('skip_nonfinite', skip_nonfinite), ('fuse', fuse)):
            if not isinstance(flag, bool):
                raise TypeError(f'{name} must be True or False, got {flag!r}')
        self.skip_nonfinite, self.fuse = skip_nonfinite, fuse

    def apply(self):
        """Patch this process (idempotent)."""
        trainer, tasks, _ = _check_hooks(self.fuse)
        _saved.setdefault('ema', trainer.ModelEMA)
        trainer.ModelEMA = _ema_factory(self.skip_nonfinite)
        if self.fuse:
            _saved.setdefault('fuse', tasks.BaseModel.__dict__['fuse'])
            _ultralytics_fuse.STOCK = _saved['fuse']
            tasks.BaseModel.fuse = _ultralytics_fuse.fuse
        elif 'fuse' in _saved:
            tasks.BaseModel.fuse = _saved.pop('fuse')

    def __call__(self, trainer):
        self.apply()  # a DDP worker starts unpatched: later rebuilds (resume, NaN recovery) must be ours too
        ema = trainer.ema
        if ema is not None and not (type(ema) is UltralyticsEMA and ema.skip_nonfinite == self.skip_nonfinite):
            _LOG.info('torchutils_ext.ultralytics: converting the %s the trainer built into UltralyticsEMA',
                      type(ema).__name__)
            trainer.ema = UltralyticsEMA.from_stock(ema, skip_nonfinite=self.skip_nonfinite)

    def report(self, trainer):
        """Epoch end: say how many EMA updates skip_nonfinite skipped (one read of the device counter)."""
        ema = trainer.ema
        n = ema.skipped if isinstance(ema, UltralyticsEMA) else 0
        if n > getattr(ema, '_reported', 0):
            _LOG.warning('torchutils_ext: %d EMA update(s) skipped so far: NaN/Inf in the model', n)
            ema._reported = n


def _is_ours(cb):
    return isinstance(cb, Integration) or isinstance(getattr(cb, '__self__', None), Integration)


def _drop(callbacks):
    """Remove our callbacks from Ultralytics' defaults."""
    for event in (_EVENT, _REPORT_EVENT):
        lst = callbacks.default_callbacks.get(event)
        if lst:
            lst[:] = [cb for cb in lst if not _is_ours(cb)]


def enable_for_ultralytics(skip_nonfinite=False, *, fuse=True) -> Integration:
    """Make Ultralytics' trainer use ``UltralyticsEMA`` and, with ``fuse=True``, ``BaseModel.fuse`` fold with our
    batched op. Call it before making the ``YOLO`` object: its callbacks, copied from Ultralytics' defaults at
    that moment, carry the integration into DDP workers (for an object made earlier:
    ``model.add_callback('on_pretrain_routine_end', integration)`` with the returned object). Calling it again
    replaces the settings. Raises RuntimeError when the installed Ultralytics lacks a hook (see module doc)."""
    integration = Integration(skip_nonfinite, fuse)
    integration.apply()
    callbacks = _modules()[3]
    _drop(callbacks)
    callbacks.default_callbacks[_EVENT].append(integration)
    callbacks.default_callbacks.setdefault(_REPORT_EVENT, []).append(integration.report)
    return integration


def disable_for_ultralytics():
    """Undo ``enable_for_ultralytics`` in this process (objects made since keep the callback in their copies)."""
    _, trainer, tasks, callbacks, _ = _modules()
    _drop(callbacks)
    if 'ema' in _saved:
        trainer.ModelEMA = _saved.pop('ema')
    if 'fuse' in _saved:
        tasks.BaseModel.fuse = _saved.pop('fuse')
