"""One YOLOv5 job in this process, with YOLOv5's own ``utils/torch_utils.py`` ('own') or torchutils_ext ('ours').

Run by ``test_yolov5_client.py`` as ``python yolov5_client.py WHICH JOB OUT [--checkout DIR] [--data DIR]
[--ckpt A.pt,B.pt]``, one process per job: YOLOv5 binds ``torch_utils`` names when its modules are imported, so
the swap has to happen before the first YOLOv5 import of a fresh process. The results are saved with
``torch.save(OUT)``.

The client is either the ``yolov5`` PyPI package (YOLOv5 v7.0, modules ``yolov5.*``) or, with ``--checkout``, a
YOLOv5 git checkout (modules ``models.*``, ``utils.*``). Everything runs offline on one CPU thread.
"""
import argparse
import contextlib
import importlib
import io
import logging
import os
import shutil
import sys
import tempfile
from copy import deepcopy
from pathlib import Path

import torch

SEED_INPUT = 1234


def offline(tmp):
    """Environment for a YOLOv5/Ultralytics process that must not reach the network or install anything."""
    os.environ.update({
        'YOLO_OFFLINE': '1', 'YOLO_CONFIG_DIR': str(tmp / 'yolo-config'), 'YOLOV5_CONFIG_DIR': str(tmp / 'y5-config'),
        'ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS': '1', 'YOLO_AUTOINSTALL': 'false', 'YOLOv5_AUTOINSTALL': 'false',
        'PIP_NO_INDEX': '1',  # a pip that YOLOv5 might still start finds nothing to install
        'TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD': '1',  # YOLOv5 checkpoints pickle whole models
        'WANDB_MODE': 'disabled', 'COMET_MODE': 'disabled',
    })
    font_dir = tmp / 'y5-config'
    font_dir.mkdir(parents=True, exist_ok=True)
    import matplotlib  # check_font downloads Arial.ttf unless a file of that name is in the config dir
    shutil.copy(Path(matplotlib.get_data_path()) / 'fonts' / 'ttf' / 'DejaVuSans.ttf', font_dir / 'Arial.ttf')
    sys.argv = sys.argv[:1]  # train.parse_opt reads sys.argv
    torch.set_num_threads(1)


class Client:
    """The YOLOv5 modules of one client, with torch_utils swapped in before any of them is imported."""

    def __init__(self, which, checkout=None):
        if checkout:
            sys.path.insert(0, str(checkout))
            self.prefix, self.root = '', Path(checkout)
        else:
            self.prefix = 'yolov5.'
            self.root = Path(importlib.util.find_spec('yolov5').origin).parent
        if which == 'ours':
            import torchutils_ext
            sys.modules[self.prefix + 'utils.torch_utils'] = torchutils_ext
        elif which != 'own':
            raise SystemExit(f'WHICH must be own or ours, not {which!r}')
        self.tu = self.module('utils.torch_utils')
        assert (self.tu.__name__ == 'torchutils_ext') == (which == 'ours'), self.tu.__name__
        self.yolo = self.module('models.yolo')
        self._no_downloads()

    def module(self, name):
        return importlib.import_module(self.prefix + name)

    def _no_downloads(self):
        # v7.0 asks the Hugging Face hub for every weights name, '' included: answer "not there" locally
        for name in ('train', 'utils.downloads', 'models.common'):
            with contextlib.suppress(ImportError):
                mod = self.module(name)
                if hasattr(mod, 'attempt_download_from_hub'):
                    mod.attempt_download_from_hub = lambda *a, **k: None

    def cfg(self, name):
        return str(self.root / 'models' / name)


@contextlib.contextmanager
def captured_logs():
    """Text logged by YOLOv5's and our loggers (model_info's summary line goes to one of them)."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    loggers = [logging.getLogger(n) for n in ('yolov5', 'torchutils_ext', 'ultralytics')]
    for lg in loggers:
        lg.addHandler(handler)
    try:
        yield buf
    finally:
        for lg in loggers:
            lg.removeHandler(handler)


def randomize_bn(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


def job_models(client, cfgs=('yolov5n.yaml', 'yolov5s.yaml')):
    """Build each model from the client's yaml, then: eval output, fuse(), ModelEMA over 5 perturbed updates,
    prune + sparsity, model_info's log line, smart_optimizer's groups."""
    tu, out = client.tu, {}
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(SEED_INPUT))
    for cfg in cfgs:
        r = out[cfg] = {}
        torch.manual_seed(0)
        with captured_logs() as log:
            model = client.yolo.Model(client.cfg(cfg))  # logs model_info's summary
            r['info_log'] = [ln for ln in log.getvalue().splitlines() if 'summary' in ln]
        r['state_dict'] = {k: v.clone() for k, v in model.state_dict().items()}
        with captured_logs():  # the seed's positional form; v7.0 returns None, Ultralytics and ours a tuple
            r['info_return'] = tu.model_info(model, False, 640)
        randomize_bn(model, 1)
        model.eval()
        with torch.no_grad():
            r['eval'] = model(x)[0]
            fused = deepcopy(model)
            with captured_logs() as log:
                fused.fuse()
            r['fuse_log'] = [ln for ln in log.getvalue().splitlines() if 'summary' in ln]
            r['fused'] = fused(x)[0]
            r['bn_left'] = sum(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        model.train()
        ema = tu.ModelEMA(model)
        g = torch.Generator().manual_seed(2)
        for _ in range(5):
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.01)
            ema.update(model)
        ema.update_attr(model, include=['yaml', 'nc', 'hyp', 'names', 'stride', 'class_weights'])
        r['ema'] = {k: v.clone() for k, v in ema.ema.state_dict().items()}
        r['ema_updates'] = ema.updates
        names = {id(p): n for n, p in model.named_parameters()}
        opt = tu.smart_optimizer(model, 'SGD', 0.01, 0.937, 5e-4)
        r['optimizer'] = [({k: v for k, v in grp.items() if k != 'params'}, [names[id(p)] for p in grp['params']])
                          for grp in opt.param_groups]
        pruned = deepcopy(model)
        tu.prune(pruned, 0.3)
        r['sparsity'] = float(tu.sparsity(pruned))
        r['sparsity_before'] = float(tu.sparsity(model))
    return out


def make_dataset(root, n_train=8, n_val=4, size=64, seed=0):
    """Tiny YOLO-format detection dataset: random images, 1-3 random boxes each, 3 classes."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split, n in (('train', n_train), ('val', n_val)):
        (root / 'images' / split).mkdir(parents=True, exist_ok=True)
        (root / 'labels' / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            rows = []
            for _ in range(rng.integers(1, 4)):
                w, h = rng.uniform(0.15, 0.5, 2)
                cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
                c = int(rng.integers(0, 3))
                x0, y0, x1, y1 = (int(v * size) for v in (cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
                img[y0:y1, x0:x1] = (60 * (c + 1), 255 - 60 * c, 40 * c)  # a box of the class colour
                rows.append(f'{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}')
            cv2.imwrite(str(root / 'images' / split / f'{i}.jpg'), img)
            (root / 'labels' / split / f'{i}.txt').write_text('\n'.join(rows) + '\n')
    yaml = root / 'data.yaml'
    yaml.write_text(f'path: {root}\ntrain: images/train\nval: images/val\nnc: 3\nnames: [a, b, c]\n')
    return yaml


def job_train(client, data_yaml, project):
    """YOLOv5's own training entry point for 2 epochs on the CPU; records what each step and epoch logged and
    the final fp32 EMA."""
    train = client.module('train')
    callbacks = client.module('utils.callbacks').Callbacks()
    rec = {'batch_loss': [], 'epoch_vals': []}
    callbacks.register_action('on_train_batch_end', callback=lambda *a: rec['batch_loss'].append(list(a[-1])))
    callbacks.register_action('on_fit_epoch_end',
                              callback=lambda vals, epoch, *a: rec['epoch_vals'].append([float(v) for v in vals]))
    emas = []
    real_ema = train.ModelEMA

    def recording_ema(*a, **k):
        emas.append(real_ema(*a, **k))
        return emas[-1]
    train.ModelEMA = recording_ema
    installs = []
    for mod in (train, client.module('utils.general')):  # nothing may try to install a package
        if hasattr(mod, 'check_requirements'):
            mod.check_requirements = lambda *a, **k: installs.append((a, k))
    opt = train.parse_opt(True)
    for k, v in dict(data=str(data_yaml), cfg=client.cfg('yolov5n.yaml'), weights='', imgsz=64, epochs=2,
                     batch_size=4, workers=0, device='cpu', project=str(project), name='run', exist_ok=True,
                     noplots=True, noautoanchor=True, seed=0).items():
        setattr(opt, k, v)
    train.main(opt, callbacks)
    ema = emas[-1]
    rec['ema'] = {k: v.clone() for k, v in ema.ema.float().state_dict().items()}
    rec['ema_updates'] = ema.updates
    rec['last'] = str(Path(opt.save_dir) / 'weights' / 'last.pt')
    rec['requirement_checks'] = len(installs)
    return rec


def job_load(client, ckpts):
    """Load each checkpoint (made by either client) and run it on a fixed input."""
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(SEED_INPUT))
    out = {}
    for path in ckpts:
        ckpt = torch.load(path, map_location='cpu', weights_only=False)
        model = ckpt['model'].float().eval()
        with torch.no_grad():
            out[path] = model(x)[0]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('which', choices=['own', 'ours'])
    ap.add_argument('job', choices=['models', 'train', 'load'])
    ap.add_argument('out')
    ap.add_argument('--checkout', help='a YOLOv5 git checkout instead of the yolov5 PyPI package')
    ap.add_argument('--data', help='dataset folder to create (train)')
    ap.add_argument('--ckpt', help='comma-separated checkpoints (load)')
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='y5client-'))
    try:
        offline(tmp)
        client = Client(args.which, args.checkout)
        if args.job == 'models':
            res = job_models(client)
        elif args.job == 'train':
            data = Path(args.data)
            res = job_train(client, make_dataset(data), data / 'runs')
        else:
            res = job_load(client, args.ckpt.split(','))
        torch.save(res, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == '__main__':
    main()
