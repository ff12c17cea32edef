"""The lab loop: reviewed cells make the next model, verified before it is used.

- :mod:`leukotree.lab.select` chooses the cells worth a technologist's review, with a
  uniformly random share kept apart as the lab's audit cells (never trained on).
- :mod:`leukotree.lab.versions` and :mod:`leukotree.lab.gate` keep model versions
  (active / candidate / retired) and decide, on the audit cells, whether a candidate may
  replace the active model.

This layer sits above :mod:`leukotree.evaluation` (it trains and scores) and below
:mod:`leukotree.serve` (the web app drives it).
"""
