"""``istr bench``: speed measurements (ISTR vs Mask R-CNN in `compare`, its phases in `phases`, the sweep
harness overhead in `sweep`); results and their history in benchmarks/README.md."""

from istr.bench.compare import add_parsers

__all__ = ["add_parsers"]
