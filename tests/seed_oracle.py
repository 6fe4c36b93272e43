"""The seed's ModelEMA, restated independently of the package (one text for tests and benchmarks:
benchmarks/seed_ref.py, on sys.path through conftest.py): the reference every EMA test compares with, since a
test that compares ModelEMA only with ModelEMA cannot see a wrong decay step."""
from seed_ref import SeedModelEMA as SeedEMA

__all__ = ['SeedEMA']
