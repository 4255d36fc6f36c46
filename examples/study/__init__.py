"""The machinery both fine-tuning studies share (``lm_study.py``, ``classification_study.py``).

A study is a :class:`study.task.Task` (a model with PEFT LoRA, its batches, its loss, its
evaluation) run by every optimizer of :data:`study.optimizers.OPTIMIZERS` over an lr grid, with
linear warmup and cosine decay (``transformers.get_cosine_schedule_with_warmup``), then with more
seeds at each optimizer's best lr. Runs are long, so the study is built to span sessions:

* every evaluation appends one row to the study's CSV as it happens (``optimizer, lr, seed,
  step, wall_s, train_loss`` + the task's metrics + ``status``);
* a checkpoint of the trainable parameters, the optimizer and the scheduler is saved at every
  evaluation (``<out>/<study>_runs/``, git-ignored), so a run killed mid-way resumes from its last
  evaluation (its later rows are dropped first) and a finished run is skipped;
* ``--workers N`` starts N processes (one CPU thread each by default) that take runs from one
  queue; a run is claimed with a lock file holding the worker's pid, so a crashed worker's run is
  picked up again by the next start.

The queue is ordered so that a study cut short is still balanced: each optimizer's middle lr
first, then its neighbours, then the grid's edges; once an optimizer's grid is complete, a best
lr on the grid's edge adds the next lr beyond it (the best lr must lie inside the grid), and a
best lr inside it adds the other seeds there.

The parts, each importing only those above it:

* :mod:`study.optimizers` -- the table of optimizers (:data:`OPTIMIZERS`), names with keyword
  arguments (``"OPLoRA[start=B,iters=2]"``, :func:`split_name`, :func:`build_optimizer`) and the
  1-3-10 lr ladder (:func:`half_decades`);
* :mod:`study.task` -- :class:`Task`, what a study trains and measures (the examples subclass it);
* :mod:`study.results` -- the study's CSV (:class:`Results`, one row per evaluation, under a
  ``flock``), :class:`RunKey` and what a run's rows say (:func:`runs_of`, :func:`finished`,
  :func:`final_value`);
* :mod:`study.queue` -- which runs come next (:func:`pending`: grid order, edge extension, seeds),
  the claims that share them among workers (:func:`claim`), and where each optimizer stands
  (:class:`Summary`, :func:`summarize`);
* :mod:`study.workers` -- one run with its checkpoints (:func:`train`), the worker loop
  (:func:`work`), and the measured cost of a step (:func:`step_cost`);
* :mod:`study.plots` -- the report's four-panel figure;
* :mod:`study.report` -- the markdown report (:func:`report`);
* :mod:`study.cli` -- the command line (:func:`cli`, :func:`main`): the options, the worker
  processes, the memory CSV, then the report.

A study script puts ``examples/`` on ``sys.path`` and imports the parts it needs, e.g.
``from study.cli import cli``.
"""
