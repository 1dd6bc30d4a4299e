#!/usr/bin/env node
// BullMQ half of aiq's side-by-side queue benchmark (see README.md).
//
//   node queue.mjs --redis-url redis://127.0.0.1:PORT [--jobs 100000] [--concurrency 100]
//                  [--in-flight 64] [--bulk 1000] [--timeout-s 600] [--json]
//
// Three phases, each on a fresh, uniquely named queue that is obliterated afterwards:
//   a. enqueue_single_per_s: queue.add, one job per call, --in-flight calls outstanding;
//   b. enqueue_bulk_per_s:   queue.addBulk in chunks of --bulk, one chunk after another;
//   c. process_per_s:        one Worker (--concurrency slots, no-op processor) drains the
//                            queue filled in (b).
// Every job has a priority 1..6 (job i gets 1 + i % 6, like aiq's six tiers) and
// removeOnComplete/removeOnFail, so a finished job leaves nothing behind.
//
// Human lines go to stdout; with --json they go to stderr instead and stdout carries exactly
// one JSON line, so `node queue.mjs ... --json | jq` and `| tail -1` both work.

import { readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { randomBytes } from 'node:crypto';

import { Queue, Worker } from 'bullmq';
import { Redis } from 'ioredis';

const HERE = dirname(fileURLToPath(import.meta.url));
const PREFIX = 'bull'; // BullMQ's default key prefix

// ---------------------------------------------------------------------------------------------
// Arguments

function usage(msg) {
  if (msg) console.error(`bullmq bench: ${msg}`);
  console.error(
    'usage: node queue.mjs --redis-url redis://HOST:PORT [--jobs 100000] [--concurrency 100]\n' +
      '                      [--in-flight 64] [--bulk 1000] [--timeout-s 600] [--json]',
  );
  process.exit(2);
}

let args;
try {
  args = parseArgs({
    options: {
      'redis-url': { type: 'string' },
      jobs: { type: 'string', default: '100000' },
      concurrency: { type: 'string', default: '100' },
      'in-flight': { type: 'string', default: '64' },
      bulk: { type: 'string', default: '1000' },
      'timeout-s': { type: 'string', default: '600' },
      json: { type: 'boolean', default: false },
      help: { type: 'boolean', short: 'h', default: false },
    },
    strict: true,
  }).values;
} catch (err) {
  usage(err.message);
}
if (args.help) usage();
if (!args['redis-url']) usage('--redis-url is required');

function positiveInt(name) {
  const raw = args[name];
  if (!/^[0-9]+$/.test(raw) || Number(raw) < 1 || !Number.isSafeInteger(Number(raw))) {
    usage(`--${name} must be a positive integer, got ${JSON.stringify(raw)}`);
  }
  return Number(raw);
}

const REDIS_URL = args['redis-url'];
const JOBS = positiveInt('jobs');
const CONCURRENCY = positiveInt('concurrency');
const IN_FLIGHT = Math.min(positiveInt('in-flight'), JOBS);
const BULK = positiveInt('bulk');
const TIMEOUT_MS = positiveInt('timeout-s') * 1000;
const JSON_OUT = args.json;

const BULLMQ_VERSION = JSON.parse(
  readFileSync(join(HERE, 'node_modules', 'bullmq', 'package.json'), 'utf8'),
).version;

const say = JSON_OUT ? (line) => console.error(line) : (line) => console.log(line);
const fmt = (n) => Math.round(n).toLocaleString('en-US');

// ---------------------------------------------------------------------------------------------
// Jobs: same shape as aiq's benchmark jobs, about 100 bytes of JSON each.

const ORGS = [
  '0b6f1b3e-2a55-4a6e-9a43-2f6f6f1b2c3d',
  '7c9e6679-7425-40de-944b-e07fc1f90ae7',
  '16fd2706-8baf-433b-82eb-8c7fada847da',
  '886313e1-3b8a-5372-9b90-0c9aee199e5d',
];
const JOB_NAME = 'llm_complete';
// One options object per priority, built once (BullMQ copies what it needs).
const OPTS = [1, 2, 3, 4, 5, 6].map((priority) => ({
  priority,
  removeOnComplete: true,
  removeOnFail: true,
}));
const jobData = (i) => ({ organization_id: ORGS[i % ORGS.length], i, prompt: 'hello' });
const jobOpts = (i) => OPTS[i % 6]; // priority 1 + i % 6

// ---------------------------------------------------------------------------------------------
// Plumbing

const RUN_ID = `${process.pid}-${Date.now().toString(36)}-${randomBytes(3).toString('hex')}`;
const queueNames = [];
const openQueues = new Set();
const openWorkers = new Set();
const clients = [];
let firstAsyncError = null;
// Set on failure: the enqueue loops stop issuing calls, so cleanup can obliterate for good.
let aborted = false;
// The phase under way, so cleanup can let its outstanding calls settle first.
let phaseRunning = Promise.resolve();

function noteError(where) {
  return (err) => {
    if (!firstAsyncError) {
      firstAsyncError = err;
      console.error(`bullmq bench: ${where} error: ${err && err.message ? err.message : err}`);
    }
  };
}

function withTimeout(promise, ms, label) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${label} did not finish within ${Math.round(ms / 1000)} s`)),
      ms,
    );
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

// After an interrupted phase returns, stop here and let fail() clean up and exit.
async function stopIfAborted() {
  if (aborted) await new Promise(() => {});
}

function newClient(extra = {}) {
  const client = new Redis(REDIS_URL, extra);
  client.on('error', noteError('redis connection'));
  clients.push(client);
  return client;
}

async function checkRedis() {
  // Fail fast with a clear message: no retries, no offline queue.
  const probe = new Redis(REDIS_URL, {
    lazyConnect: true,
    connectTimeout: 5000,
    maxRetriesPerRequest: 0,
    enableOfflineQueue: false,
    retryStrategy: () => null,
  });
  let cause = null; // ioredis reports the socket error here, then rejects with "Connection is closed."
  probe.on('error', (err) => (cause ??= err));
  try {
    await withTimeout(probe.connect(), 10_000, 'connecting');
    const info = await probe.info('server');
    const m = /redis_version:([^\r\n]+)/.exec(info);
    return m ? m[1] : 'unknown';
  } catch (err) {
    console.error(`bullmq bench: cannot reach Redis at ${REDIS_URL}: ${(cause ?? err).message}`);
    process.exit(1);
  } finally {
    probe.disconnect();
  }
}

async function newQueue(connection, phase) {
  const name = `aiq-bench-${RUN_ID}-${phase}`;
  queueNames.push(name);
  const queue = new Queue(name, { connection, prefix: PREFIX });
  queue.on('error', noteError(`queue ${phase}`));
  openQueues.add(queue);
  await withTimeout(queue.waitUntilReady(), 30_000, `queue ${phase} connecting`);
  return queue;
}

async function dropQueue(queue) {
  await queue.obliterate({ force: true });
  await queue.close();
  openQueues.delete(queue);
}

// Keys of this run's queues that are still in Redis (there should be none at the end).
async function leftoverKeys(client) {
  const found = [];
  for (const name of queueNames) {
    let cursor = '0';
    do {
      const [next, keys] = await client.scan(cursor, 'MATCH', `${PREFIX}:${name}:*`, 'COUNT', 1000);
      cursor = next;
      found.push(...keys);
    } while (cursor !== '0');
  }
  return found;
}

// ---------------------------------------------------------------------------------------------
// Phases

// (a) queue.add, one job per call, IN_FLIGHT calls outstanding (like aiq's buffer_unordered(64)).
async function enqueueSingle(queue) {
  let next = 0;
  async function lane() {
    while (next < JOBS && !aborted) {
      const i = next++;
      await queue.add(JOB_NAME, jobData(i), jobOpts(i));
    }
  }
  const start = performance.now();
  await Promise.all(Array.from({ length: IN_FLIGHT }, lane));
  return (performance.now() - start) / 1000;
}

// (b) queue.addBulk in chunks of BULK, sequentially.
async function enqueueBulk(queue) {
  const start = performance.now();
  for (let from = 0; from < JOBS && !aborted; from += BULK) {
    const to = Math.min(from + BULK, JOBS);
    const chunk = new Array(to - from);
    for (let i = from; i < to; i++) {
      chunk[i - from] = { name: JOB_NAME, data: jobData(i), opts: jobOpts(i) };
    }
    await queue.addBulk(chunk);
  }
  return (performance.now() - start) / 1000;
}

// (c) One Worker drains the queue. Completion is counted from the worker's own 'completed'
// events: BullMQ emits one in-process after each job's moveToCompleted has returned from Redis,
// so counting them costs no Redis traffic, whereas polling getJobCounts would add round trips
// to the Redis that is being measured and would quantise the end time to the poll interval.
async function processAll(queueName, connection) {
  let completed = 0;
  let failed = 0;
  let firstFailure = null;
  let finish;
  const done = new Promise((resolve) => (finish = resolve));

  const worker = new Worker(queueName, async () => {}, {
    connection,
    prefix: PREFIX,
    concurrency: CONCURRENCY,
    autorun: false, // connect first, start the clock at run()
    removeOnComplete: true,
    removeOnFail: true,
    // drainDelay is only the BZPOPMIN timeout used once the queue is empty; the queue is full
    // when the clock starts and the clock stops on the last 'completed' event, so it cannot add
    // an idle wait to the figure. 1 s (the smallest whole value) just makes close() prompt.
    drainDelay: 1,
    // The stalled-jobs check runs once at start (not awaited by the fetch loop) and then every
    // stalledInterval ms; it never blocks fetching. Left at BullMQ's default, as in production.
  });
  openWorkers.add(worker);
  worker.on('error', noteError('worker'));
  worker.on('completed', () => {
    if (++completed + failed === JOBS) finish();
  });
  worker.on('failed', (_job, err) => {
    firstFailure ??= err;
    if (completed + ++failed === JOBS) finish();
  });

  await withTimeout(worker.waitUntilReady(), 30_000, 'worker connecting');
  const start = performance.now();
  const running = worker.run();
  running.catch(noteError('worker run'));
  await withTimeout(done, TIMEOUT_MS, `processing ${fmt(JOBS)} jobs`);
  const secs = (performance.now() - start) / 1000;

  await worker.close();
  openWorkers.delete(worker);
  if (failed > 0) {
    throw new Error(`${failed} of ${JOBS} no-op jobs failed (first: ${firstFailure?.message})`);
  }
  return secs;
}

// ---------------------------------------------------------------------------------------------
// Main

async function cleanupAfterFailure() {
  aborted = true;
  await withTimeout(phaseRunning, 30_000, 'the interrupted phase').catch(() => {});
  for (const worker of openWorkers) await worker.close(true).catch(() => {});
  for (const queue of openQueues) {
    await queue.obliterate({ force: true }).catch(() => {});
    await queue.close().catch(() => {});
  }
}

async function main() {
  const redisVersion = await checkRedis();
  say(
    `bullmq ${BULLMQ_VERSION} against Redis ${redisVersion} at ${REDIS_URL}: ` +
      `${fmt(JOBS)} jobs, priorities 1..6, removeOnComplete`,
  );

  // One shared connection for every Queue (BullMQ allows sharing it among Queues; a Worker
  // cannot share, it needs maxRetriesPerRequest: null and duplicates it for its blocking reads).
  const queueConn = newClient();
  const workerConn = newClient({ maxRetriesPerRequest: null });

  // (a)
  const single = await newQueue(queueConn, 'single');
  const singleSecs = await withTimeout((phaseRunning = enqueueSingle(single)), TIMEOUT_MS, 'enqueue single');
  await stopIfAborted();
  const enqueueSinglePerS = JOBS / singleSecs;
  say(
    `bullmq enqueue single: ${fmt(enqueueSinglePerS)} jobs/s ` +
      `(${fmt(JOBS)} jobs, ${IN_FLIGHT} in flight, ${singleSecs.toFixed(2)} s)`,
  );
  await withTimeout(dropQueue(single), TIMEOUT_MS, 'obliterating the single-enqueue queue');

  // (b)
  const bulk = await newQueue(queueConn, 'bulk');
  const bulkSecs = await withTimeout((phaseRunning = enqueueBulk(bulk)), TIMEOUT_MS, 'enqueue bulk');
  await stopIfAborted();
  const enqueueBulkPerS = JOBS / bulkSecs;
  say(
    `bullmq enqueue bulk:   ${fmt(enqueueBulkPerS)} jobs/s ` +
      `(${fmt(JOBS)} jobs, addBulk of ${fmt(BULK)}, ${bulkSecs.toFixed(2)} s)`,
  );

  // (c)
  const waiting = await bulk.getJobCounts('prioritized', 'wait');
  if (waiting.prioritized + waiting.wait !== JOBS) {
    throw new Error(`expected ${JOBS} queued jobs before processing, found ${JSON.stringify(waiting)}`);
  }
  const processSecs = await processAll(bulk.name, workerConn);
  const processPerS = JOBS / processSecs;
  say(
    `bullmq process:        ${fmt(processPerS)} jobs/s ` +
      `(${fmt(JOBS)} no-op jobs, 1 worker, concurrency ${CONCURRENCY}, ${processSecs.toFixed(2)} s)`,
  );
  const after = await bulk.getJobCounts();
  const remaining = Object.values(after).reduce((a, b) => a + b, 0);
  if (remaining !== 0) {
    throw new Error(`jobs left in the queue after processing: ${JSON.stringify(after)}`);
  }
  await withTimeout(dropQueue(bulk), TIMEOUT_MS, 'obliterating the bulk queue');

  const left = await leftoverKeys(queueConn);
  if (left.length > 0) {
    await queueConn.del(...left);
    console.error(
      `bullmq bench: warning: obliterate left ${left.length} key(s) (deleted now), e.g. ${left[0]}`,
    );
  }
  await Promise.all(clients.map((c) => c.quit().catch(() => c.disconnect())));

  if (JSON_OUT) {
    console.log(
      JSON.stringify({
        system: 'bullmq',
        bullmq_version: BULLMQ_VERSION,
        jobs: JOBS,
        concurrency: CONCURRENCY,
        enqueue_single_per_s: Math.round(enqueueSinglePerS),
        enqueue_bulk_per_s: Math.round(enqueueBulkPerS),
        process_per_s: Math.round(processPerS),
      }),
    );
  }
}

// A closed stdout/stderr (e.g. `| head`) must not kill the run before it cleans up.
for (const stream of [process.stdout, process.stderr]) {
  stream.on('error', (err) => {
    if (err.code !== 'EPIPE') throw err;
  });
}

let failing = null;
function fail(message, code) {
  failing ??= (async () => {
    console.error(`bullmq bench: FAILED: ${message}`);
    await withTimeout(cleanupAfterFailure(), 60_000, 'cleanup').catch((e) =>
      console.error(`bullmq bench: cleanup: ${e.message}`),
    );
    process.exit(code);
  })();
  return failing;
}
process.on('SIGINT', () => fail('interrupted (SIGINT)', 130));
process.on('SIGTERM', () => fail('terminated (SIGTERM)', 143));

try {
  await main();
  if (failing) await failing;
  process.exit(0);
} catch (err) {
  await fail(err.message, 1);
}
