"""What a person or a program reads: the console (tables, progress, the verdict), ``--json`` documents, the plot.

Runs in the head only. ``documents`` is the one view of a plan and of a
result; the console's tables print what it holds.
"""
