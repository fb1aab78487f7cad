"""Cost models: what a step costs on a degree of parallelism (fitted, measured or derived from hardware
ceilings), and the estimates of plan units built on them."""
