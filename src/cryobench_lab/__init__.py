"""cryobench_lab: heterogeneous cryo-EM reconstruction on one physics core and one set of metrics."""

__version__ = "0.1.0"
