"""Simulation: orcinus's own engine and schedulers against a simulated executor with a virtual
clock, a roofline cost model per iteration, hardware descriptions and their calibration.
See docs/design.md, "Simulation"."""
