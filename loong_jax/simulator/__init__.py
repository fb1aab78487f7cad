"""Cluster simulator: the real scheduler (EngineState + policies) on a virtual clock driven by the cost model.

  1. `workloads`: synthetic datasets (ShareGPT-, L-Eval-, LV-Eval-like, mixed, Zipf) and trace files.
  2. `sim_executor.SimExecutor`: the executor interface (`submit`, `wait_next`) with cost-model step times.
  3. `run.simulate`: the engine loop over one request rate; `run.search_max_rate`: max throughput under SLO.
  4. `metrics`: normalised latencies, TPOT, SLO attainment; `report`: tables and plots; `cli.simulate_main`.
"""
