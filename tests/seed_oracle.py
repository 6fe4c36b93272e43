"""The seed's ModelEMA and decay ramp, restated independently of the package: the reference every EMA test
compares with (a test that compares ModelEMA only with ModelEMA cannot see a wrong decay step), and the seed row
of the benchmarks (benchmarks/seed_ref.py imports it)."""
import math
from copy import deepcopy

import torch

__all__ = ['SeedEMA', 'SeedModelEMA', 'seed_decay']


def seed_decay(updates, decay=0.9999, tau=2000):
    return decay * (1 - math.exp(-updates / tau))


class SeedModelEMA:
    """The seed's ModelEMA.update: state_dict() of both models every call, `v *= d; v += (1 - d) * m`."""

    def __init__(self, model, decay=0.9999, tau=2000, updates=0):
        self.ema = deepcopy(model).eval()
        self.updates = updates
        self.decay = lambda x: decay * (1 - math.exp(-x / tau))
        for p in self.ema.parameters():
            p.requires_grad_(False)

    def update(self, model):
        with torch.no_grad():
            self.updates += 1
            d = self.decay(self.updates)
            msd = model.state_dict()
            for k, v in self.ema.state_dict().items():
                if v.dtype.is_floating_point:
                    v *= d
                    v += (1 - d) * msd[k].detach()


SeedEMA = SeedModelEMA
