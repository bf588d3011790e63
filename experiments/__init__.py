"""A/B experiments: the simulator on a synthetic world, arms, A/B statistics, drift monitors and the
experiment report. Independent of the offline evaluation package (``evaluation``).

* Config and run: ``config`` (the experiment TOML), ``arms`` (bundles, services, update policies),
  ``population`` (history and choice model), ``power_plan``, ``simulator`` (the day-by-day loop),
  ``simulation_result``.
* Statistics: ``conventions``, ``estimators``, ``srm``, ``power``, ``always_valid``,
  ``group_sequential``, ``multiple_testing``, ``guardrails``, ``drift``.
* Report: ``user_metrics``, ``studies`` (replicate studies), ``analysis``, ``plots``,
  ``report_markdown``, ``report`` (writes the files).
"""
