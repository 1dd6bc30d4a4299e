// Asks an aiq queue about jobs' outcomes: what an app does after enqueueing.
//
//   AIQ_REDIS_URL=redis://127.0.0.1:6379/ [AIQ_QUEUE_PREFIX=aiq] node dist/examples/outcome.js COMMAND ...
//
//   get ID                 prints the job's status as JSON
//   wait ID [TIMEOUT_MS]   waits for the job to finish, prints its final status
//   cancel ID              prints cancelled | running | finished | not_found
//   events FROM COUNT      prints COUNT events after position FROM ("0": from the start), one JSON
//                          line each, then exits
//
// Exits 0; 3 with "not found" on stderr for an id that exists nowhere; 4 when wait times out;
// 1 with a message for anything else. Its connections are named aiq-example (CLIENT LIST).

import Redis from "ioredis";
import { AiqJobNotFound, AiqQueue, AiqTimeoutError } from "../src";

const USAGE = "usage: outcome.js get ID | wait ID [TIMEOUT_MS] | cancel ID | events FROM COUNT";

function print(value: unknown): void {
  process.stdout.write(JSON.stringify(value) + "\n");
}

async function run(queue: AiqQueue, args: string[]): Promise<void> {
  const [command, id, extra] = args;
  if (!id) throw new Error(USAGE);
  switch (command) {
    case "get": {
      const status = await queue.getJob(id);
      if (status === null) throw new AiqJobNotFound(id);
      return print(status);
    }
    case "wait":
      return print(await queue.waitUntilFinished(id, { timeoutMs: extra ? Number(extra) : undefined }));
    case "cancel":
      return print(await queue.cancel(id));
    case "events": {
      const count = Number(extra);
      if (!Number.isInteger(count) || count < 1) throw new Error(USAGE);
      let seen = 0;
      for await (const event of queue.events({ from: id, blockMs: 1000 })) {
        print(event);
        seen += 1;
        if (seen === count) return;
      }
      return;
    }
    default:
      throw new Error(USAGE);
  }
}

async function main(): Promise<void> {
  const url = process.env.AIQ_REDIS_URL;
  if (!url) throw new Error("AIQ_REDIS_URL is not set (e.g. redis://127.0.0.1:6379/)");
  const redis = new Redis(url, { connectionName: "aiq-example" });
  redis.on("error", () => undefined); // a dropped connection is retried; its errors surface in the calls
  try {
    await run(new AiqQueue({ connection: redis, prefix: process.env.AIQ_QUEUE_PREFIX || "aiq" }), process.argv.slice(2));
  } finally {
    redis.disconnect();
  }
}

main().catch((e: unknown) => {
  process.stderr.write(`outcome: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = e instanceof AiqJobNotFound ? 3 : e instanceof AiqTimeoutError ? 4 : 1;
});
