"""ModelEMA's decay schedules and update phases.

A schedule maps x, the number of the averaging update (1, 2, ...), to its decay, by the formula of the peer it
comes from, computed on the host as that peer computes it. ``Phases`` says which optimizer steps average, copy or
write nothing (``update_every_n_steps``, ``update_after_step``). For ``capturable=True`` the same values come from
the device counter with no host sync (``device_decay``): a table of the host values, looked up by x, and past the
table the formula in float64 tensor ops (whose exp/pow may differ from the host's in the last bit).

Each schedule is an object, not a lambda, so that a ModelEMA pickles.
"""
from __future__ import annotations

import functools
import math
import numbers

import torch

# Most entries a decay table holds: 8 MB of float64, timm's default warm-up settles after ~10^6; the seed's ramp
# settles after ~37 * tau (~75,000 with the default tau), so its own limit keeps it exact up to tau ~110,000.
TABLE_LIMIT = 1 << 20
RAMP_TABLE_LIMIT = 1 << 22


class Schedule:
    """A decay schedule: ``schedule(x)`` for the x-th averaging update; ``cap``, the value it rises to and then
    keeps (None: it never settles); ``on_device(x)``, the formula over a float64 tensor of x."""

    __slots__ = ()
    cap = None

    def args(self):
        return tuple(getattr(self, k) for k in self.__slots__)

    def __reduce__(self):
        return type(self), self.args()

    def __eq__(self, other):
        return type(other) is type(self) and other.args() == self.args()

    def __hash__(self):
        return hash((type(self), self.args()))

    def __repr__(self):
        return f'{type(self).__name__}{self.args()}'


class SeedRamp(Schedule):
    """The seed's ramp, ``decay * (1 - math.exp(-x / tau))`` (the same expression, so the same bits)."""

    __slots__ = ('decay', 'tau')

    def __init__(self, decay, tau):
        self.decay, self.tau = decay, tau

    def __call__(self, x):
        return self.decay * (1 - math.exp(-x / self.tau))

    @property
    def cap(self):
        return self.decay

    def on_device(self, x):
        return torch.rsub(torch.exp(torch.neg(x).div_(self.tau)), 1).mul_(self.decay)


class Warmup(Schedule):
    """timm's warm-up (ModelEmaV3 ``use_warmup=True``): ``1 - (1 + x / gamma) ** -power``, clamped to
    [min_decay, decay] (``max(min(., decay), min_decay)``, timm's order)."""

    __slots__ = ('decay', 'min_decay', 'gamma', 'power')

    def __init__(self, decay, min_decay, gamma, power):
        self.decay, self.min_decay, self.gamma, self.power = decay, min_decay, gamma, power

    def __call__(self, x):
        return max(min(1 - (1 + x / self.gamma) ** -self.power, self.decay), self.min_decay)

    @property
    def cap(self):
        return max(self.decay, self.min_decay)

    def on_device(self, x):
        raw = torch.rsub(torch.pow(x.div(self.gamma).add_(1), -self.power), 1)
        return raw.clamp_(max=self.decay).clamp_(min=self.min_decay)


class Constant(Schedule):
    """One decay for every update (torch.optim.swa_utils.get_ema_multi_avg_fn, Lightning, NeMo)."""

    __slots__ = ('decay',)

    def __init__(self, decay):
        self.decay = decay

    def __call__(self, x):
        return self.decay

    @property
    def cap(self):
        return self.decay

    def on_device(self, x):
        return torch.full_like(x, self.decay)


class HalfLife(Schedule):
    """torchtitan's half-life: ``2 ** (-1 / (fraction * x))``, so the average's half-life is that fraction of the
    updates so far. x = 0 (never an averaging update) gives the formula's limit, 0."""

    __slots__ = ('fraction',)

    def __init__(self, fraction):
        self.fraction = fraction

    def __call__(self, x):
        return 2.0 ** (-1.0 / (self.fraction * x)) if x > 0 else 0.0

    def on_device(self, x):
        return torch.pow(2.0, torch.reciprocal(x.mul(self.fraction)).neg_())


SCHEDULES = ('ramp', 'warmup', 'constant', 'half_life')


@functools.lru_cache(maxsize=16)
def host_values(schedule: Schedule):
    """``schedule(x)`` for x = 0, 1, ... as the host computes it, up to the first value equal to its cap (every
    later one is the cap too: each schedule only rises towards it) or TABLE_LIMIT entries (RAMP_TABLE_LIMIT for
    the seed's ramp). Returns (values, settled)."""
    out, cap = [], schedule.cap
    for x in range(RAMP_TABLE_LIMIT if type(schedule) is SeedRamp else TABLE_LIMIT):
        out.append(schedule(x))
        if out[-1] == cap:
            return out, True
    return out, False


class DecayTable:
    """The host values of a schedule as a tensor beside the device counter ``like``; ``settled`` says whether they
    reach the cap (else the formula serves the updates past them)."""

    __slots__ = ('values', 'settled')

    def __init__(self, schedule: Schedule, like: torch.Tensor):
        values, self.settled = host_values(schedule)
        self.values = torch.tensor(values, dtype=like.dtype, device=like.device)


def lookup(schedule, table, x):
    """The decay of update x (a 1-element tensor, x >= 1) on the device: the table's entry, and past an unsettled
    table the formula."""
    values, settled = table.values, table.settled
    n = values.numel()
    got = values.index_select(0, x.clamp(max=n - 1).long())
    return got if settled else torch.where(x < n, got, schedule.on_device(x))


class Phases:
    """Which optimizer steps write (``update_every_n_steps``, ``update_after_step``). Step u (1, 2, ...: the value
    of ``ema.updates`` after it) copies the model into the EMA while u < first (timm's ``update_after_step`` = A:
    first = A + 2, its first averaging step); from ``first`` on every ``every``-th step averages, the first of
    them included (Lightning, NeMo, torchtitan), and the others write nothing."""

    __slots__ = ('every', 'first')

    def __init__(self, every, after):
        self.every, self.first = every, 1 if after is None else after + 2

    def position(self, u):
        """None: step u writes nothing; 0: it copies; x >= 1: it is the x-th averaging update."""
        if u < self.first:
            return 0
        q, r = divmod(u - self.first, self.every)
        return None if r else q + 1

    def on_device(self, u, decay_of):
        """The decay of step u (a float tensor) with no host sync: 1 where it writes nothing (the kernels then
        write nothing), 0 where it copies (the kernels then copy exactly), else ``decay_of(x)``."""
        off = u - self.first
        rest = torch.remainder(off, self.every)
        d = decay_of(torch.div(off - rest, self.every).add_(1).clamp_(min=1))
        d = torch.where(rest == 0, d, 1.0)
        return torch.where(u < self.first, 0.0, d) if self.first > 1 else d


def device_decay(count, schedule, table, phases=None):
    """The decay of the next update (``count`` updates done: a 1-element device tensor) as a 0-d device tensor."""
    u = count + 1
    if phases is None:
        return lookup(schedule, table, u).view(())
    return phases.on_device(u, lambda x: lookup(schedule, table, x)).view(())


def _number(name, v, low, high=math.inf, low_open=False):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f'{name} must be a number, got {type(v).__name__}')
    v = float(v)
    if not (math.isfinite(v) and (v > low if low_open else v >= low) and v <= high):
        raise ValueError(f'{name} must be in {"(" if low_open else "["}{low}, {high}], got {v}')
    return v


def _count(name, v, low):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f'{name} must be an integer >= {low}, got {v!r}')
    return int(v)


WARMUP_DEFAULTS = {'min_decay': 0.0, 'warmup_gamma': 1.0, 'warmup_power': 2 / 3}
HALF_LIFE_DEFAULTS = {'half_life_fraction': 0.05}


def make_schedule(name, decay, tau, min_decay, warmup_gamma, warmup_power, half_life_fraction):
    """The schedule ``ModelEMA(schedule=name, ...)`` asks for; a parameter that the schedule does not use must
    keep its default (a ValueError says which is ignored otherwise)."""
    if name not in SCHEDULES:
        raise ValueError(f'schedule must be one of {SCHEDULES}, got {name!r}')
    given = {'min_decay': min_decay, 'warmup_gamma': warmup_gamma, 'warmup_power': warmup_power,
             'half_life_fraction': half_life_fraction}
    used = {'warmup': WARMUP_DEFAULTS, 'half_life': HALF_LIFE_DEFAULTS}.get(name, {})
    for k, default in {**WARMUP_DEFAULTS, **HALF_LIFE_DEFAULTS}.items():
        if k not in used and given[k] != default:
            raise ValueError(f"{k} is not used by schedule={name!r}; it belongs to schedule="
                             f"{'warmup' if k in WARMUP_DEFAULTS else 'half_life'!r}")
    if name != 'ramp' and tau != 2000:
        raise ValueError(f"tau is used by schedule='ramp' only, not {name!r}")
    if name == 'half_life' and decay != 0.9999:
        raise ValueError("decay is not used by schedule='half_life' (torchtitan's formula has no cap)")
    if name == 'ramp':
        return SeedRamp(decay, tau)
    if name == 'constant':
        return Constant(decay)
    if name == 'half_life':
        return HalfLife(_number('half_life_fraction', half_life_fraction, 0.0, low_open=True))
    return Warmup(decay, _number('min_decay', min_decay, 0.0, 1.0),
                  _number('warmup_gamma', warmup_gamma, 0.0, low_open=True),
                  _number('warmup_power', warmup_power, 0.0, low_open=True))


def make_phases(update_every_n_steps, update_after_step):
    """None for the seed's phases (every step averages), else a Phases."""
    every = _count('update_every_n_steps', update_every_n_steps, 1)
    after = None if update_after_step is None else _count('update_after_step', update_after_step, 0)
    return None if every == 1 and after is None else Phases(every, after)
