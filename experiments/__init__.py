"""A/B experiments: the simulator on a synthetic world, arms, A/B statistics, drift monitors and the
experiment report. Independent of the offline evaluation package (``evaluation``)."""
