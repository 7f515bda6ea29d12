"""Direction methods and the maths around them, as pure functions of tensors: PCA, the Jacobian,
supervised directions, probes, calibration, sign rules and top/bottom selection."""
