"""Analysis: which heads and directions matter (sensitivity), how to spend a byte budget on them (ranks or widths),
and the metrics file and report that record it."""
