"""``istr bench``: speed measurements (ISTR vs Mask R-CNN: the command in `compare`, the driver in `timing`, one
timed unit in `units`, the models in `models`, the batch in `inputs`; ISTR's phases in `phases`; one preset cell
in `cell`; the sweep harness overhead in `sweep`); results and their history in benchmarks/README.md."""

from istr.bench.compare import add_parsers

__all__ = ["add_parsers"]
