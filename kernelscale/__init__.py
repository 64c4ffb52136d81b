"""kernelscale: the ensemble-correlation kernel of large ensembles, from logits to k-NN.

Stages, one module per role:

* :mod:`kernelscale.sources`   -- local ``log.pt`` folders, safe loading and validation, labels
* :mod:`kernelscale.simulate`  -- synthetic ensembles in the Hub's file layout
* :mod:`kernelscale.store`     -- the Zarr store: logits, manifest, running statistics
* :mod:`kernelscale.plan`      -- the pure tile planner
* :mod:`kernelscale.kernel`    -- the streaming accumulator with checkpoints
* :mod:`kernelscale.evaluate`  -- baselines, weighted k-NN, honest selection, ablations
* :mod:`kernelscale.curve`     -- accuracy against the number of runs
* :mod:`kernelscale.interpret` -- most similar pairs, failure modes, random examples
* :mod:`kernelscale.report`    -- the self-contained HTML report
* :mod:`kernelscale.config`    -- validated job configuration
* :mod:`kernelscale.cli`       -- the ``kernelscale`` command
"""

__version__ = "0.1.0"
