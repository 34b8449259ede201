"""Run infrastructure: the workdir and its rules, checkpoints, devices and processes,
process-wide settings, stop signals."""
