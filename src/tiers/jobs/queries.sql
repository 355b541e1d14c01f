-- The job queue's statements, by name (tiers.jobs.sql loads them). Each block
-- starts with a `-- name:` line and is one statement. Parameters are psycopg's
-- %(name)s placeholders.

-- name: enqueue
-- One job. run_at, when given, wins over delay; with neither the job is due now,
-- by the database's clock (so the clocks of app hosts do not matter).
-- ON CONFLICT: only the unique-key index can conflict; no row comes back then.
INSERT INTO tiers_jobs (queue, task, args, priority, run_at, max_attempts, unique_key)
VALUES (%(queue)s, %(task)s, %(args)s::jsonb, %(priority)s,
        coalesce(%(run_at)s::timestamptz, now() + make_interval(secs => %(delay)s::float8)),
        %(max_attempts)s, %(unique_key)s)
ON CONFLICT DO NOTHING
RETURNING id

-- name: enqueue_many
-- Many jobs in one statement, column by column; batch_id may be NULL.
INSERT INTO tiers_jobs (queue, task, args, priority, run_at, max_attempts, unique_key, batch_id)
SELECT j.queue, j.task, j.args, j.priority,
       coalesce(j.run_at, now() + make_interval(secs => j.delay)),
       j.max_attempts, j.unique_key, %(batch_id)s::bigint
FROM unnest(%(queues)s::text[], %(tasks)s::text[], %(args)s::text[]::jsonb[],
            %(priorities)s::int[], %(run_ats)s::timestamptz[], %(delays)s::float8[],
            %(max_attempts)s::int[], %(unique_keys)s::text[])
     AS j(queue, task, args, priority, run_at, delay, max_attempts, unique_key)
ON CONFLICT DO NOTHING
RETURNING id

-- name: claim
-- Take the first due job (see tiers_jobs_claim in schema.sql): queues in the
-- order given, then highest priority, then earliest run_at.
SELECT id, queue, task, args, attempts, max_attempts, batch_id, unique_key, run_at
FROM tiers_jobs_claim(%(queues)s::text[], %(worker)s, %(lease)s::float8)

-- name: finish_and_claim
-- Record the outcome of the worker's job and claim the next one, in one round
-- trip. The outcome applies only while the job is still this worker's (its
-- lease may have expired and another worker taken it). status is 'done',
-- 'pending' (a retry after delay seconds) or 'dead'. PostgreSQL runs a
-- data-modifying WITH to completion even though the claim does not read it.
WITH finished AS (
    UPDATE tiers_jobs
    SET status = %(status)s,
        result = %(result)s::jsonb,
        last_error = coalesce(%(error)s, last_error),
        run_at = CASE WHEN %(status)s = 'pending'
                      THEN now() + make_interval(secs => %(delay)s::float8) ELSE run_at END,
        lease_until = NULL,
        finished_at = CASE WHEN %(status)s = 'pending' THEN NULL ELSE now() END
    WHERE id = %(id)s AND worker = %(worker)s AND status = 'running'
    RETURNING id
)
SELECT id, queue, task, args, attempts, max_attempts, batch_id, unique_key, run_at
FROM tiers_jobs_claim(%(queues)s::text[], %(worker)s, %(lease)s::float8)

-- name: finish
-- The outcome alone (the worker is about to exit); true if it applied.
UPDATE tiers_jobs
SET status = %(status)s,
    result = %(result)s::jsonb,
    last_error = coalesce(%(error)s, last_error),
    run_at = CASE WHEN %(status)s = 'pending'
                  THEN now() + make_interval(secs => %(delay)s::float8) ELSE run_at END,
    lease_until = NULL,
    finished_at = CASE WHEN %(status)s = 'pending' THEN NULL ELSE now() END
WHERE id = %(id)s AND worker = %(worker)s AND status = 'running'
RETURNING id

-- name: unclaim
-- Give back a job claimed but never started (the worker is stopping): pending
-- again at once, its attempt not counted.
UPDATE tiers_jobs
SET status = 'pending', attempts = attempts - 1, lease_until = NULL, worker = NULL,
    started_at = NULL
WHERE id = %(id)s AND worker = %(worker)s AND status = 'running'
RETURNING id

-- name: renew_lease
-- A heartbeat: the job stays this worker's for another lease. No row means it is not.
UPDATE tiers_jobs SET lease_until = now() + make_interval(secs => %(lease)s::float8)
WHERE id = %(id)s AND worker = %(worker)s AND status = 'running'
RETURNING id

-- name: release_worker
-- A worker died or was killed: its running jobs are due again at once, or
-- dead if that was their last attempt. reason says what happened.
UPDATE tiers_jobs
SET status = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'pending' END,
    run_at = now(), lease_until = NULL,
    last_error = %(reason)s || ' (attempt ' || attempts || ' of ' || max_attempts || ')',
    finished_at = CASE WHEN attempts >= max_attempts THEN now() END
WHERE status = 'running' AND worker = %(worker)s
RETURNING id, status

-- name: release_expired
-- Running jobs whose lease ran out (their worker stopped renewing it): due
-- again at once, or dead if that was their last attempt.
UPDATE tiers_jobs
SET status = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'pending' END,
    run_at = now(), lease_until = NULL,
    last_error = 'the lease of worker ' || coalesce(worker, '?') || ' expired at '
                 || lease_until || ' (attempt ' || attempts || ' of ' || max_attempts || ')',
    finished_at = CASE WHEN attempts >= max_attempts THEN now() END
WHERE id IN (SELECT id FROM tiers_jobs
             WHERE status = 'running' AND lease_until < now()
             ORDER BY lease_until
             LIMIT 1000
             FOR UPDATE SKIP LOCKED)
RETURNING id, status

-- name: next_due
-- Seconds until the earliest pending job of the queues is due (NULL if none).
SELECT extract(epoch FROM min(run_at) - now())::float8
FROM tiers_jobs
WHERE status = 'pending' AND queue = ANY(%(queues)s::text[])

-- name: prune_done
-- Forget done jobs finished more than older_than seconds ago, a slice at a time.
DELETE FROM tiers_jobs
WHERE id IN (SELECT id FROM tiers_jobs
             WHERE status = 'done'
               AND finished_at < now() - make_interval(secs => %(older_than)s::float8)
             ORDER BY finished_at
             LIMIT %(limit)s)

-- name: get_job
SELECT id, queue, task, args, priority, run_at, status, attempts, max_attempts, unique_key,
       lease_until, worker, last_error, result, batch_id, created_at, started_at, finished_at
FROM tiers_jobs
WHERE id = %(id)s

-- name: list_jobs
-- Newest first; NULL filters match everything.
SELECT id, queue, task, args, priority, run_at, status, attempts, max_attempts, unique_key,
       lease_until, worker, last_error, result, batch_id, created_at, started_at, finished_at
FROM tiers_jobs
WHERE (%(status)s::text IS NULL OR status = %(status)s)
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(task)s::text IS NULL OR task = %(task)s)
ORDER BY id DESC
LIMIT %(limit)s

-- name: retry_dead
-- Dead jobs back to pending with fresh attempts. A job whose unique key is held
-- by another pending or running job stays dead (retrying it would be a duplicate).
UPDATE tiers_jobs AS j
SET status = 'pending', attempts = 0, run_at = now(), lease_until = NULL, worker = NULL,
    finished_at = NULL
WHERE j.status = 'dead'
  AND (%(all)s OR j.id = ANY(%(ids)s::bigint[]))
  AND (%(queue)s::text IS NULL OR j.queue = %(queue)s)
  AND (%(task)s::text IS NULL OR j.task = %(task)s)
  AND (j.unique_key IS NULL OR NOT EXISTS (
        SELECT 1 FROM tiers_jobs o
        WHERE o.unique_key = j.unique_key AND o.status IN ('pending', 'running')))
RETURNING j.id

-- name: delete_dead
DELETE FROM tiers_jobs
WHERE status = 'dead'
  AND (%(all)s OR id = ANY(%(ids)s::bigint[]))
  AND (%(queue)s::text IS NULL OR queue = %(queue)s)
  AND (%(task)s::text IS NULL OR task = %(task)s)
RETURNING id

-- name: job_states
-- The status of each of the ids (missing ids have no row).
SELECT id, status FROM tiers_jobs WHERE id = ANY(%(ids)s::bigint[])

-- name: queue_stats
-- Per queue: ready (due now), scheduled (due later), running and dead jobs,
-- and how long the oldest ready job has been due, in seconds.
SELECT queue,
       count(*) FILTER (WHERE status = 'pending' AND run_at <= now()) AS ready,
       count(*) FILTER (WHERE status = 'pending' AND run_at > now()) AS scheduled,
       count(*) FILTER (WHERE status = 'running') AS running,
       count(*) FILTER (WHERE status = 'dead') AS dead,
       extract(epoch FROM now() - min(run_at) FILTER (
           WHERE status = 'pending' AND run_at <= now()))::float8 AS oldest_ready_age
FROM tiers_jobs
WHERE status IN ('pending', 'running', 'dead')
GROUP BY queue
ORDER BY queue

-- name: create_batch
INSERT INTO tiers_job_batches (name, total, on_complete_task, on_complete_args,
                               on_complete_queue)
VALUES (%(name)s, %(total)s, %(on_complete_task)s, %(on_complete_args)s::jsonb,
        %(on_complete_queue)s)
RETURNING id

-- name: get_batch
-- A batch and how many of its chunks are pending or running right now.
SELECT b.id, b.name, b.total, b.done, b.dead,
       (SELECT count(*) FROM tiers_jobs j
        WHERE j.batch_id = b.id AND j.status IN ('pending', 'running')) AS open,
       b.created_at, b.finished_at
FROM tiers_job_batches b
WHERE b.id = %(id)s

-- name: list_batches
SELECT b.id, b.name, b.total, b.done, b.dead,
       (SELECT count(*) FROM tiers_jobs j
        WHERE j.batch_id = b.id AND j.status IN ('pending', 'running')) AS open,
       b.created_at, b.finished_at
FROM tiers_job_batches b
ORDER BY b.id DESC
LIMIT %(limit)s

-- name: claim_tick
-- A scheduler's claim on one cron tick; no row when another scheduler has it.
INSERT INTO tiers_cron_ticks (schedule, tick) VALUES (%(schedule)s, %(tick)s)
ON CONFLICT DO NOTHING
RETURNING schedule

-- name: record_tick_job
UPDATE tiers_cron_ticks SET job_id = %(job_id)s WHERE schedule = %(schedule)s AND tick = %(tick)s

-- name: prune_ticks
-- Ticks long past every scheduler's look-back window (before, by the scheduler's clock).
DELETE FROM tiers_cron_ticks WHERE tick < %(before)s
