"""One Ultralytics job in a fresh process, stock ('stock') or with ``enable_for_ultralytics`` ('ours').

Run by ``test_ultralytics_integration.py`` as ``python ultralytics_runs.py WHICH JOB OUT [options]``; the results
are saved with ``torch.save(OUT)``. Offline, CPU, one thread. Jobs:

- ``train``: ``YOLO('yolov8n.yaml').train(...)`` for 2 epochs on a generated dataset (``--data``); records the
  per-batch losses, the metrics of each validation, the final fp32 EMA, and checkpoint paths. ``--poison K``
  writes a NaN into one weight right after the K-th optimizer step and restores it after that step's EMA update
  (training itself is untouched: only the EMA sees it); ``--skip-step K`` instead disables the EMA for the K-th
  update and advances its counter (what ``skip_nonfinite`` should amount to). ``--resume CKPT`` continues a run.
- ``load``: each checkpoint of ``--ckpt`` loaded with ``YOLO(path)``, run unfused, fused (``Model.fuse``, ours
  when enabled) and in float64, and through ``predict``.
- ``ddp-parent`` / ``ddp-worker``: Ultralytics' own DDP hand-off (``generate_ddp_file``) and what each worker
  does with it, on 2 gloo ranks (see the test).
"""
import argparse
import os
import shutil
import sys
import tempfile
from copy import deepcopy
from pathlib import Path

import torch

from yolov5_client import make_dataset

SEED_INPUT = 1234
POISONED = 'model.0.conv.weight'  # the stem conv: its NaN reaches every output of the EMA model
TRAIN_ARGS = dict(imgsz=64, epochs=2, batch=4, nbs=4, workers=0, device='cpu', seed=0, deterministic=True,
                  plots=False, amp=False, save_period=1, exist_ok=True, verbose=False)


def offline(tmp):
    os.environ.update({'YOLO_OFFLINE': '1', 'YOLO_CONFIG_DIR': str(tmp / 'yolo-config'),
                       'ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS': '1', 'YOLO_AUTOINSTALL': 'false',
                       'PIP_NO_INDEX': '1', 'WANDB_MODE': 'disabled', 'COMET_MODE': 'disabled'})
    torch.set_num_threads(1)


def floats(d):
    return {k: float(v) for k, v in d.items()}


def state(module):
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


class Recorder:
    """Callbacks that record a run, and optionally poison or skip one EMA update."""

    def __init__(self, poison=None, skip_step=None):
        self.rec = {'batch_loss': [], 'metrics': [], 'steps': 0}
        self.poison, self.skip_step, self.saved = poison, skip_step, None

    def attach(self, model):
        for event in ('on_train_start', 'on_train_batch_start', 'on_train_batch_end', 'on_train_epoch_end', 'on_model_save',
                      'on_fit_epoch_end', 'on_train_end'):
            model.add_callback(event, getattr(self, event))

    def on_train_start(self, trainer):
        self.rec['ema_class'] = type(trainer.ema).__name__
        self.rec['ema_mode'] = getattr(trainer.ema, 'mode', 'their lerp')

        def after_step(*_):  # after optimizer.step(), before the trainer's ema.update(model)
            self.rec['steps'] += 1
            if self.rec['steps'] == self.poison:
                w = dict(trainer.model.named_parameters())[POISONED]
                self.saved = w.detach()[0, 0, 0, 0].clone()
                with torch.no_grad():
                    w[0, 0, 0, 0] = float('nan')
            if self.rec['steps'] == self.skip_step:
                trainer.ema.enabled = False
        trainer.optimizer.register_step_post_hook(after_step)

    def on_train_batch_start(self, trainer):  # kept for the last batch: the inputs of the final EMA update
        self.rec['ema_prev'] = state(trainer.ema.ema)

    def on_train_batch_end(self, trainer):
        self.rec['batch_loss'].append([float(v) for v in trainer.loss_items.values()])
        if self.saved is not None:  # after the EMA update: the live model is whole again
            with torch.no_grad():
                dict(trainer.model.named_parameters())[POISONED][0, 0, 0, 0] = self.saved
            self.saved = None
        if not trainer.ema.enabled:  # the skipped update still counts, as skip_nonfinite counts it
            trainer.ema.enabled = True
            trainer.ema.updates += 1

    def on_train_epoch_end(self, trainer):  # before validation and save_model's NaN repair
        self.rec.setdefault('ema_before_save', []).append(state(trainer.ema.ema))

    def on_model_save(self, trainer):
        self.rec.setdefault('ema_after_save', []).append(state(trainer.ema.ema))
        self.rec.setdefault('model_at_save', []).append(state(trainer.model))

    def on_fit_epoch_end(self, trainer):
        self.rec['metrics'].append((trainer.epoch, floats(trainer.metrics)))

    def on_train_end(self, trainer):
        ema = trainer.ema
        self.rec.update(ema=state(ema.ema), model=state(trainer.model), updates=ema.updates,
                        skipped=getattr(ema, 'skipped', None), last=str(trainer.last), best=str(trainer.best),
                        epoch0=str(trainer.wdir / 'epoch0.pt'))


def enable(which, skip_nonfinite=False):
    if which == 'ours':
        from torchutils_ext.ultralytics import enable_for_ultralytics
        enable_for_ultralytics(skip_nonfinite=skip_nonfinite)


def job_train(args, data):
    from ultralytics import YOLO
    rec = Recorder(args.poison, args.skip_step)
    if args.resume:
        model = YOLO(args.resume)
        rec.attach(model)
        model.train(resume=True, save_dir=str(Path(args.project) / 'run'))
    else:
        model = YOLO('yolov8n.yaml')
        rec.attach(model)
        model.train(data=str(data), project=str(args.project), name='run', **TRAIN_ARGS)
    return rec.rec


def job_load(ckpts):
    import numpy as np
    from ultralytics import YOLO
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(SEED_INPUT))
    img = (np.random.default_rng(SEED_INPUT).random((64, 64, 3)) * 255).astype(np.uint8)
    from ultralytics.nn.tasks import BaseModel
    out = {'fuse_impl': BaseModel.fuse.__module__}
    for path in ckpts:
        r = out[path] = {}
        model = YOLO(path)
        net = model.model.float().eval()
        with torch.no_grad():
            r['unfused'] = net(x)[0]
            r['float64'] = deepcopy(net).double()(x.double())[0]
            model.fuse(verbose=False)
            r['fused'] = model.model(x)[0]
        r['bn_left'] = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.model.modules())
        pred = YOLO(path).predict(img, imgsz=64, conf=0.0, max_det=20, verbose=False)[0]
        r['predict'] = pred.boxes.data.clone()
    return out


def job_ddp_parent(args, data):
    """What ``BaseTrainer.train`` does before it launches DDP workers: ``generate_ddp_file(trainer)``."""
    from ultralytics import YOLO
    from ultralytics.utils.dist import generate_ddp_file
    model = YOLO('yolov8n.yaml')
    cls = model._smart_load('trainer')
    overrides = {**model.overrides, **TRAIN_ARGS, 'epochs': 1, 'data': str(data), 'project': str(args.project),
                 'name': 'ddp', 'model': 'yolov8n.yaml', 'mode': 'train'}
    return {'py': generate_ddp_file(cls(overrides=overrides, _callbacks=model.callbacks))}


class _GlooDDP(torch.nn.parallel.DistributedDataParallel):
    """The trainer's DDP wrap with ``device_ids=[None]`` (a CPU device has no index) dropped, as CPU DDP needs."""

    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module, device_ids=None if device_ids == [None] else device_ids, **kwargs)


def job_ddp_worker(args):
    """One rank: the trainer rebuilt from the pickled state as the generated script does, then its own training
    loop (``_do_train``) with world_size 2. Ultralytics 8.4's DDP is CUDA-only in three places, replaced here by
    their gloo/CPU equivalents: ``_setup_ddp`` (the process group, made here), the DDP wrap's ``device_ids`` and
    the final validation of best.pt (skipped: it picks a CUDA device on ranks > 0)."""
    import torch.distributed as dist
    dist.init_process_group('gloo')
    torch.nn.parallel.DistributedDataParallel = _GlooDDP
    from ultralytics.utils import DEFAULT_CFG_DICT
    from ultralytics.utils.patches import torch_load
    st = torch_load(str(Path(args.state).with_suffix('.pt')), map_location='cpu')
    cfg = DEFAULT_CFG_DICT.copy()
    cfg.update(save_dir='')
    trainer = st['trainer'](cfg=cfg, overrides=st['args'], _callbacks=st['callbacks'])
    trainer.model = st['model']
    from ultralytics.engine import trainer as trainer_module
    patched = getattr(trainer_module.ModelEMA, 'torchutils_ext', False)  # False: the parent's patch is not here
    trainer.world_size = dist.get_world_size()
    trainer._setup_ddp = lambda: None
    trainer.final_eval = lambda: None
    seen = []
    trainer.add_callback('on_train_batch_end', lambda t: seen.append(type(t.ema).__name__))
    trainer.train()
    ema = trainer.ema
    rec = {'rank': dist.get_rank(), 'patched_before_train': patched, 'ema_class': type(ema).__name__, 'classes_seen': sorted(set(seen)),
           'skip_nonfinite': getattr(ema, 'skip_nonfinite', None), 'updates': ema.updates,
           'wrapped': type(trainer.model).__name__}
    flat = torch.cat([v.flatten().float() for v in ema.ema.state_dict().values()])
    every = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(every, flat)
    rec['same_ema_all_ranks'] = all(torch.equal(every[0], f) for f in every)
    rec['ema_finite'] = bool(torch.isfinite(flat).all())
    # resume and NaN recovery rebuild the EMA through the trainer's module name: ours in this worker too
    trainer._load_checkpoint_state({'ema': deepcopy(ema.ema).half(), 'updates': 7})
    rec['rebuilt_class'] = type(trainer.ema).__name__
    rec['rebuilt_updates'] = trainer.ema.updates
    dist.destroy_process_group()
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('which', choices=['stock', 'ours'])
    ap.add_argument('job', choices=['train', 'load', 'ddp-parent', 'ddp-worker'])
    ap.add_argument('out')
    ap.add_argument('--data', help='dataset folder to create')
    ap.add_argument('--project', help='runs folder')
    ap.add_argument('--poison', type=int)
    ap.add_argument('--skip-step', type=int)
    ap.add_argument('--skip-nonfinite', action='store_true')
    ap.add_argument('--resume')
    ap.add_argument('--ckpt', help='comma-separated checkpoints (load)')
    ap.add_argument('--state', help='the DDP file ddp-parent wrote (ddp-worker)')
    ap.add_argument('--config', help='Ultralytics config folder (shared by the DDP parent and its workers)')
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='ul-run-'))
    try:
        offline(Path(args.config) if args.config else tmp)
        if args.job != 'ddp-worker':  # a worker gets the integration only through the pickled callbacks
            enable(args.which, args.skip_nonfinite)
        data = None
        if args.data:
            data = Path(args.data) / 'data.yaml'
            if not data.exists():
                data = make_dataset(args.data, n_train=16, n_val=8)
        if args.job == 'train':
            res = job_train(args, data)
        elif args.job == 'load':
            res = job_load(args.ckpt.split(','))
        elif args.job == 'ddp-parent':
            res = job_ddp_parent(args, data)
        else:
            res = job_ddp_worker(args)
        torch.save(res, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
