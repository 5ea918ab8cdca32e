"""The execution layer: Celery tasks that run a submission's container and score its outputs.

Read it in the order a submission passes through it:

1. :mod:`worker.app` -- the Celery app, its queues and :class:`~worker.app.WorkerSettings`;
2. :mod:`worker.pipeline` -- the database rules every step shares (locks, run ownership and
   heartbeat, the exactly-once score insert, the completion rule, failing a submission);
3. :mod:`worker.runs` -- what every container run shares (the runtime chosen by
   ``WorkerSettings.runtime``, run folders, the image, limits, the supervised run);
4. :mod:`worker.validation` -- ``validate`` and ``validate_run``: the image, the public sample,
   the shards;
5. :mod:`worker.inference` -- ``infer_shard``: claim, stage, run, record one shard;
6. :mod:`worker.scoring` -- ``score``: the one scoring path, rows inserted once;
7. :mod:`worker.finalize` -- ``finalize``: scored, with the leaderboard statistics;
8. :mod:`worker.reaper` -- ``reap``: work of vanished workers, storage of ended submissions.

Each step imports only the steps after it (to enqueue them). Building blocks without a database:
:mod:`worker.runtime` (the container-runtime interface and Docker), :mod:`worker.sandbox`,
:mod:`worker.staging`, :mod:`worker.outputs`, :mod:`worker.monitoring`.
"""
