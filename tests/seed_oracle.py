"""The seed's ModelEMA, restated independently of the package: the reference every EMA test compares with
(a test that compares ModelEMA only with ModelEMA cannot see a wrong decay step)."""
import copy
import math

import torch


class SeedEMA:
    """The seed's ModelEMA, re-stated: state_dict every step, v *= d; v += (1 - d) * m for floating entries."""

    def __init__(self, model, decay=0.9999, tau=2000, updates=0):
        self.ema = copy.deepcopy(model).eval()
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
