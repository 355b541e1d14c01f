-- The job queue's tables, indexes and triggers, in the jobs database (the
-- primary). tiers.jobs.store.install_schema runs this whole file in one
-- transaction under an advisory lock, on every `tiers up` and every worker
-- start, so every statement here must be idempotent: IF NOT EXISTS,
-- CREATE OR REPLACE.

-- A batch: a long piece of work split into chunk jobs. The counters are kept
-- by the trigger tiers_jobs_batch below, in the chunk's own transaction, so
-- they always agree with the chunks' states.
CREATE TABLE IF NOT EXISTS tiers_job_batches (
    id                bigserial PRIMARY KEY,
    name              text NOT NULL DEFAULT '',
    total             integer NOT NULL CHECK (total >= 0),
    done              integer NOT NULL DEFAULT 0,
    dead              integer NOT NULL DEFAULT 0,
    -- Enqueued (with batch_id added to its arguments) when done + dead reaches total.
    on_complete_task  text,
    on_complete_args  jsonb,
    on_complete_queue text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    finished_at       timestamptz
);

-- One row per job, for its whole life:
--
--   pending --claim--> running --success--> done
--      ^                  |
--      +---- failure -----+ (attempts < max_attempts: run_at = now() + backoff)
--      |                  +--- failure, attempts used up ---> dead
--      +---- lease expired / worker died (run at once; dead if attempts are used up)
--   dead --`tiers jobs retry`--> pending (attempts from 0)
--
-- attempts counts claims, so a job that keeps killing its worker is buried too.
CREATE TABLE IF NOT EXISTS tiers_jobs (
    id           bigserial PRIMARY KEY,
    queue        text NOT NULL CHECK (queue ~ '^[A-Za-z0-9_.:-]{1,63}$'),
    task         text NOT NULL CHECK (length(task) BETWEEN 1 AND 200),
    args         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(args) = 'object'),
    -- Higher runs first; equal priorities run in run_at order, then id order.
    priority     integer NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'running', 'done', 'dead')),
    attempts     integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    max_attempts integer NOT NULL DEFAULT 5 CHECK (max_attempts >= 1),
    unique_key   text CHECK (length(unique_key) BETWEEN 1 AND 500),
    -- While running: the claim is the worker's until lease_until; heartbeats push it on.
    lease_until  timestamptz,
    worker       text,
    last_error   text,
    result       jsonb,
    batch_id     bigint REFERENCES tiers_job_batches (id) ON DELETE SET NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    started_at   timestamptz,
    finished_at  timestamptz
);

-- The claim's index: only pending rows, in the order they are taken.
CREATE INDEX IF NOT EXISTS tiers_jobs_ready
    ON tiers_jobs (queue, priority DESC, run_at, id) WHERE status = 'pending';
-- At most one pending or running job per unique key; done and dead ones do not count.
CREATE UNIQUE INDEX IF NOT EXISTS tiers_jobs_unique_key
    ON tiers_jobs (unique_key) WHERE status IN ('pending', 'running') AND unique_key IS NOT NULL;
-- Running jobs by lease: the expiry sweep, and a dead worker's jobs (few rows).
CREATE INDEX IF NOT EXISTS tiers_jobs_leases
    ON tiers_jobs (lease_until) WHERE status = 'running';
-- Pruning of finished jobs, oldest first.
CREATE INDEX IF NOT EXISTS tiers_jobs_done
    ON tiers_jobs (finished_at) WHERE status = 'done';
CREATE INDEX IF NOT EXISTS tiers_jobs_dead
    ON tiers_jobs (queue, id) WHERE status = 'dead';
CREATE INDEX IF NOT EXISTS tiers_jobs_batch
    ON tiers_jobs (batch_id) WHERE batch_id IS NOT NULL;

-- The claim: the first due job of the first queue (in the order given) that has
-- one; within a queue, highest priority first, then earliest run_at, then id.
-- One index-ordered scan per queue: the first pending row not locked by another
-- claimer (SKIP LOCKED) is taken, so concurrent claimers never wait for each
-- other and never take the same job.
CREATE OR REPLACE FUNCTION tiers_jobs_claim(claim_queues text[], claim_worker text,
                                            claim_lease float8)
RETURNS TABLE (id bigint, queue text, task text, args jsonb, attempts integer,
               max_attempts integer, batch_id bigint, unique_key text, run_at timestamptz)
LANGUAGE plpgsql AS $tiers$
#variable_conflict use_column
DECLARE
    wanted text;
BEGIN
    FOREACH wanted IN ARRAY claim_queues LOOP
        RETURN QUERY
        UPDATE tiers_jobs AS j
        SET status = 'running', attempts = j.attempts + 1, worker = claim_worker,
            lease_until = now() + make_interval(secs => claim_lease), started_at = now()
        FROM (SELECT t.id FROM tiers_jobs t
              WHERE t.status = 'pending' AND t.queue = wanted AND t.run_at <= now()
              ORDER BY t.priority DESC, t.run_at, t.id
              LIMIT 1
              FOR UPDATE SKIP LOCKED) AS next
        WHERE j.id = next.id
        RETURNING j.id, j.queue, j.task, j.args, j.attempts, j.max_attempts, j.batch_id,
                  j.unique_key, j.run_at;
        IF FOUND THEN
            RETURN;
        END IF;
    END LOOP;
END
$tiers$;

-- Each cron tick a scheduler enqueued, one row per schedule and tick: the
-- primary key is what makes a tick enqueued once however many schedulers run.
CREATE TABLE IF NOT EXISTS tiers_cron_ticks (
    schedule    text NOT NULL,
    tick        timestamptz NOT NULL,
    job_id      bigint,
    enqueued_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (schedule, tick)
);

-- Wake-up hints for idle workers: one notification per queue per statement
-- (and PostgreSQL drops duplicates within a transaction), sent at commit, so a
-- rolled-back enqueue wakes nobody. Workers poll as well, so a lost hint only
-- costs latency.
CREATE OR REPLACE FUNCTION tiers_jobs_notify_inserted() RETURNS trigger
LANGUAGE plpgsql AS $tiers$
BEGIN
    PERFORM pg_notify('tiers_jobs', q.queue) FROM (SELECT DISTINCT queue FROM inserted) q;
    RETURN NULL;
END
$tiers$;

CREATE OR REPLACE TRIGGER tiers_jobs_inserted
    AFTER INSERT ON tiers_jobs REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION tiers_jobs_notify_inserted();

-- A job back in pending (a retry, an expired lease, `tiers jobs retry`): wake
-- a worker, which runs it or learns when it is due.
CREATE OR REPLACE FUNCTION tiers_jobs_notify_requeued() RETURNS trigger
LANGUAGE plpgsql AS $tiers$
BEGIN
    PERFORM pg_notify('tiers_jobs', NEW.queue);
    RETURN NULL;
END
$tiers$;

CREATE OR REPLACE TRIGGER tiers_jobs_requeued
    AFTER UPDATE OF status ON tiers_jobs
    FOR EACH ROW WHEN (NEW.status = 'pending' AND OLD.status <> 'pending')
    EXECUTE FUNCTION tiers_jobs_notify_requeued();

-- A chunk of a batch reached (or left) done or dead: count it, and when the
-- batch is complete, stamp it and enqueue its completion job.
CREATE OR REPLACE FUNCTION tiers_jobs_batch_progress() RETURNS trigger
LANGUAGE plpgsql AS $tiers$
DECLARE
    b tiers_job_batches%ROWTYPE;
BEGIN
    UPDATE tiers_job_batches
    SET done = done + (NEW.status = 'done')::int - (OLD.status = 'done')::int,
        dead = dead + (NEW.status = 'dead')::int - (OLD.status = 'dead')::int
    WHERE id = NEW.batch_id
    RETURNING * INTO b;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF b.finished_at IS NULL AND b.done + b.dead >= b.total THEN
        UPDATE tiers_job_batches SET finished_at = now() WHERE id = b.id;
        IF b.on_complete_task IS NOT NULL THEN
            INSERT INTO tiers_jobs (queue, task, args, unique_key)
            VALUES (b.on_complete_queue, b.on_complete_task,
                    coalesce(b.on_complete_args, '{}') || jsonb_build_object('batch_id', b.id),
                    'tiers-batch-complete:' || b.id)
            ON CONFLICT DO NOTHING;
        END IF;
    ELSIF b.finished_at IS NOT NULL AND b.done + b.dead < b.total THEN
        -- A dead chunk was retried: the batch is open again.
        UPDATE tiers_job_batches SET finished_at = NULL WHERE id = b.id;
    END IF;
    RETURN NULL;
END
$tiers$;

CREATE OR REPLACE TRIGGER tiers_jobs_batch
    AFTER UPDATE OF status ON tiers_jobs
    FOR EACH ROW WHEN (NEW.batch_id IS NOT NULL AND NEW.status <> OLD.status
                       AND (NEW.status IN ('done', 'dead') OR OLD.status IN ('done', 'dead')))
    EXECUTE FUNCTION tiers_jobs_batch_progress();
