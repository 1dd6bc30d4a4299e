// Starts a throwaway redis-server for the tests: a free loopback port, no persistence.

import { ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";
import Redis from "ioredis";

export interface TestRedis {
  port: number;
  url: string;
  stop(): Promise<void>;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on("error", reject);
    srv.listen(0, "127.0.0.1", () => {
      const { port } = srv.address() as net.AddressInfo;
      srv.close(() => resolve(port));
    });
  });
}

async function waitReady(port: number, child: ChildProcess, output: () => string): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (child.exitCode !== null) {
      throw new Error(`redis-server exited with ${child.exitCode}: ${output()}`);
    }
    const probe = new Redis({ port, host: "127.0.0.1", lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null });
    probe.on("error", () => undefined);
    try {
      await probe.connect();
      if ((await probe.ping()) === "PONG") return;
    } catch {
      // not up yet
    } finally {
      probe.disconnect();
    }
    if (Date.now() > deadline) throw new Error(`redis-server did not answer on ${port}: ${output()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** Starts redis-server (REDIS_SERVER overrides the binary) on a free port. */
export async function startRedis(): Promise<TestRedis> {
  const bin = process.env.REDIS_SERVER || "redis-server";
  const dir = mkdtempSync(path.join(os.tmpdir(), "aiq-node-client-"));
  for (let attempt = 0; ; attempt++) {
    const port = await freePort();
    const child = spawn(
      bin,
      ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
      { stdio: ["ignore", "pipe", "pipe"] },
    );
    let out = "";
    child.stdout!.on("data", (b: Buffer) => (out += b.toString()));
    child.stderr!.on("data", (b: Buffer) => (out += b.toString()));
    const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
    child.once("error", (e) => (out += String(e)));
    try {
      await waitReady(port, child, () => out);
    } catch (e) {
      child.kill("SIGKILL");
      await exited;
      // Another process may have taken the port between freePort and the spawn: try again.
      if (attempt < 3 && /in use/i.test(out)) continue;
      rmSync(dir, { recursive: true, force: true });
      throw e;
    }
    return {
      port,
      url: `redis://127.0.0.1:${port}/`,
      async stop() {
        if (child.exitCode === null) {
          child.kill("SIGTERM");
          const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
          await exited;
          clearTimeout(timer);
        }
        rmSync(dir, { recursive: true, force: true });
      },
    };
  }
}

/** A redis-server and a connection to it, for one test file. */
export async function startTestRedis(): Promise<{ server: TestRedis; redis: Redis }> {
  const server = await startRedis();
  return { server, redis: new Redis(server.url) };
}

export async function stopTestRedis(t: { server?: TestRedis; redis?: Redis }): Promise<void> {
  t.redis?.disconnect();
  await t.server?.stop();
}

/** Redis's clock in ms. */
export async function redisNowMs(redis: Redis): Promise<number> {
  const [s, us] = await redis.time();
  return Number(s) * 1000 + Math.floor(Number(us) / 1000);
}

/** How many times the server ran EVAL (the NOSCRIPT fallback). */
export async function evalCalls(redis: Redis): Promise<number> {
  const m = /^cmdstat_eval:calls=(\d+)/m.exec(await redis.info("commandstats"));
  return m ? Number(m[1]) : 0;
}
