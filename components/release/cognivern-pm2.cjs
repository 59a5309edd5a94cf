'use strict';
// Managed by cognivern-infra; installed beside cognivern-release. The release tool's one way to read
// PM2's state:
//   node cognivern-pm2.cjs QUERY [NAME]             asks the app's PM2 daemon itself (see below)
//   pm2 jlist | node cognivern-pm2.cjs QUERY [NAME]  the same answer from `pm2 jlist` on stdin
// An unreadable answer (a busy daemon, broken JSON) gives no output (pids) or a placeholder line
// (status), never an error.
//   pids NAME      pids of NAME's online processes, one a line
//   status         one line per process, for `cognivern-release status`
//   delete NAME    (from PM2 itself only) deletes app NAME like `pm2 delete NAME`; prints the count
//
// The tool's two polling loops run here too, one process each (see "Watching a slot" below):
//   healthy NAME URL SECONDS DIR BASE PID   waits until NAME answers healthy from DIR
//   bake NAME URL SECONDS DIR PID           watches NAME for SECONDS
//
// Without stdin input (no --stdin) the script sends PM2's own `getMonitorData` call (what `pm2
// jlist` sends) to $PM2_HOME/rpc.sock with the RPC modules of the pm2 package found on PATH: less
// than half the CPU of `pm2 jlist`, which loads all of PM2's CLI (bench/pm2_calls.py: 0.09-0.12 s
// against 0.24-0.28 s on an idle machine, more on a busy one); a watcher keeps its connection.
// Exit 3: no pm2 package with those modules (ask `pm2 jlist` instead). Exit 4: no daemon listens.
const fs = require('fs');
const path = require('path');

const fromStdin = process.argv.includes('--stdin');
const [query, arg] = process.argv.slice(2).filter((a) => a !== '--stdin');

const env = (p) => p.pm2_env || {};

// `pm2 jlist`'s output as a process list, or null when it is not one
function parseList(text) {
  try {
    const list = JSON.parse(text);
    return Array.isArray(list) ? list : null;
  } catch (err) {
    return null;
  }
}

// App `name`'s sum of restarts, processes errored or stopped, and processes
function restartsOf(list, name) {
  const mine = list.filter((p) => p.name === name);
  return {
    restarts: mine.reduce((n, p) => n + (env(p).restart_time || 0), 0),
    down: mine.filter((p) => ['errored', 'stopped'].includes(env(p).status)).length,
    count: mine.length,
  };
}

function pidsOf(list, name) {
  return list.filter((p) => p.name === name && env(p).status === 'online' && p.pid).map((p) => p.pid);
}

function answer(list) {
  switch (query) {
    case 'pids':
      return pidsOf(list, arg).map(String);
    case 'status':
      if (!list.length) return ['  (no processes)'];
      return list.map((p) => `  ${p.name} #${p.pm_id} pid=${p.pid} ${env(p).status} restarts=${env(p).restart_time} mode=${env(p).exec_mode}`);
    default:
      console.error(`cognivern-pm2: unknown query '${query}'`);
      process.exit(2);
  }
  return [];
}

// PM2's RPC client modules, or null: PM2 7.0.4 bundles them under modules/; node_modules/ is tried
// too, for other layouts.
function rpcModules() {
  for (const dir of (process.env.PATH || '').split(':')) {
    let pkg;
    try {
      pkg = path.dirname(path.dirname(fs.realpathSync(path.join(dir || '.', 'pm2'))));
    } catch (err) {
      continue;
    }
    for (const sub of ['modules', 'node_modules']) {
      try {
        return { axon: require(path.join(pkg, sub, 'pm2-axon')), rpc: require(path.join(pkg, sub, 'pm2-axon-rpc')) };
      } catch (err) {
        // not there: the next place
      }
    }
    return null;
  }
  return null;
}

// PM2's RPC socket, connected: resolves to call(method, ...args) -> Promise; to 'missing' without
// the modules (exit 3: the caller uses PM2's CLI instead), to 'down' when nothing listens there
// (exit 4: no daemon, so no app runs; `pm2 jlist` would start a daemon to say so).
function connect() {
  const home = process.env.PM2_HOME || path.join(process.env.HOME || '', '.pm2');
  const mods = rpcModules();
  if (!mods) return Promise.resolve('missing');
  const req = mods.axon.socket('req');
  const client = new mods.rpc.Client(req);
  return new Promise((resolve) => {
    client.sock.once('reconnect attempt', () => resolve('down')); // nothing listens (no daemon)
    client.sock.once('error', () => resolve('down'));
    client.sock.once('connect', () => resolve((method, ...args) => new Promise((ok, fail) => {
      client.call(method, ...args, (err, res) => (err ? fail(err) : ok(res)));
    })));
    req.connect(path.join(home, 'rpc.sock'));
  });
}

// `delete NAME`, what `pm2 delete NAME` sends (lib/API.js _operate): stop and forget each of
// NAME's processes. Prints how many there were.
async function deleteApp(call) {
  const ids = (await call('getMonitorData', {})).filter((p) => p.name === arg).map((p) => p.pm_id);
  for (const id of ids) await call('deleteProcessId', id); // (the CLI's notify after it finds no process)
  console.log(ids.length);
}

// A query must answer within 3 s (a busy daemon: no answer); a
// delete waits for the processes to stop (PM2's kill_timeout), then the CLI takes over. The time
// counts from before the connection: a daemon that accepts none must not hang the tool.
async function viaDaemon() {
  const giveUp = () => {
    if (query === 'delete') process.exit(3);
    print(null);
    process.exit(0);
  };
  const limit = setTimeout(giveUp, query === 'delete' ? 60000 : 3000);
  const call = await connect();
  if (call === 'missing') process.exit(3);
  if (call === 'down') process.exit(4);
  try {
    if (query === 'delete') await deleteApp(call);
    else print(await call('getMonitorData', {}));
  } catch (err) {
    giveUp();
  }
  clearTimeout(limit);
  process.exit(0);
}

// ---- Watching a slot: the tool's two polling loops --------------------------------------------
// Every 250 ms the tool asked for the slot's health (curl) and, every 4th turn, PM2's counters: a
// node start per question (0.09-0.12 s of CPU, on the production server too, during every bake).
// Here one process asks both over one RPC connection for the whole wait and prints one verdict
// line, which the tool checks against the forms below. It runs as the app user, like every PM2
// question; the app answers its own health check anyway. PID is the tool's process: once it is
// gone (killed mid-bake), the watcher stops too.
//   healthy: "ok" (answers ok from DIR), "crash B R D C" (PM2 shows a crash loop: restarts R, at
//            least BASE B + 2, or D processes errored/stopped, or C = 0 processes), "timeout" after
//            SECONDS. BASE "-": PM2's restart count at the start.
//   bake:    "ok" after SECONDS, "stale" (its workers do not run from DIR), "restarts B R D C" (PM2
//            restarted or lost it: restarts B at the start, R now), "sick" (3 failed checks in a row),
//            "unanswered" (PM2 gave no readable answer at the start, three times).
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// GET url on a new connection (like curl): true for a 2xx answer whose body has "status":"ok",
// within 2 s.
function healthOk(url) {
  return new Promise((resolve) => {
    const http = require('http');
    const req = http.get(url, { agent: false }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d) => { if (body.length < 65536) body += d; });
      res.on('end', () => resolve(res.statusCode >= 200 && res.statusCode < 300 && /"status"\s*:\s*"ok"/.test(body)));
      res.on('error', () => resolve(false));
    });
    req.setTimeout(2000, () => req.destroy());
    req.on('error', () => resolve(false));
    req.on('close', () => resolve(false)); // (a no-op once answered)
  });
}

// PM2's process list, or null when no readable answer came within 3 s (the caller skips that
// sample; `busy`: the daemon took no connection within 3 s). Without RPC modules, through
// `pm2 jlist`; no daemon: no processes.
async function processList(call) {
  if (call === 'busy') return null;
  if (call === 'down') return [];
  if (call === 'missing') {
    return parseList(require('child_process').spawnSync('pm2', ['jlist'], { encoding: 'utf8', timeout: 10000 }).stdout);
  }
  const answered = call('getMonitorData', {}).then((list) => (Array.isArray(list) ? list : null), () => null);
  return Promise.race([answered, sleep(3000).then(() => null)]);
}

// Every online process of `name` runs in `dir` (their cwd; the app user's own processes).
function servedFrom(list, name, dir) {
  const pids = pidsOf(list || [], name);
  const cwd = (pid) => {
    try {
      return fs.readlinkSync(`/proc/${pid}/cwd`);
    } catch (err) {
      return null;
    }
  };
  return pids.length > 0 && pids.every((pid) => cwd(pid) === dir);
}

async function waitHealthy(call, [name, url, seconds, dir, baseArg]) {
  const deadline = Date.now() + Number(seconds) * 1000;
  let base = Number(baseArg);
  if (baseArg === '-') {
    const list = await processList(call);
    base = list ? restartsOf(list, name).restarts : 0;
  }
  for (let n = 1; Date.now() < deadline; n++) {
    if ((await healthOk(url)) && servedFrom(await processList(call), name, dir)) return 'ok';
    if (n % 4 === 0) {
      const list = await processList(call);
      const r = list && restartsOf(list, name);
      if (r && (r.count === 0 || r.down > 0 || r.restarts >= base + 2)) return `crash ${base} ${r.restarts} ${r.down} ${r.count}`;
    }
    await sleep(250);
  }
  return 'timeout';
}

// PM2's counters only grow and its statuses stay, so asking once a second (every 4th turn) misses
// nothing; the health check every 250 ms sees a dead slot sooner (nginx sends its requests to the
// backup meanwhile). One slow answer on a busy host is not a failure; a sick app answers 500 at once.
async function bake(call, [name, url, seconds, dir]) {
  const first = (await processList(call)) || (await processList(call)) || (await processList(call));
  if (!first) return 'unanswered';
  const base = restartsOf(first, name).restarts;
  const end = Date.now() + Number(seconds) * 1000;
  if (!servedFrom(first, name, dir)) return 'stale';
  let fails = 0;
  for (let n = 0; Date.now() < end; n++) {
    if (n % 4 === 0) {
      const list = await processList(call);
      const r = list && restartsOf(list, name);
      if (r && (r.count === 0 || r.down > 0 || r.restarts > base)) return `restarts ${base} ${r.restarts} ${r.down} ${r.count}`;
    }
    fails = (await healthOk(url)) ? 0 : fails + 1;
    if (fails >= 3) return 'sick';
    await sleep(250);
  }
  return 'ok';
}

async function watch(mode, args) {
  const toolPid = Number(args[args.length - 1]);
  const alive = () => {
    try {
      process.kill(toolPid, 0);
      return true;
    } catch (err) {
      return err.code === 'EPERM'; // (the tool is root's: it exists)
    }
  };
  setInterval(() => alive() || process.exit(1), 500).unref();
  const call = await Promise.race([connect(), sleep(3000).then(() => 'busy')]);
  console.log(await (mode === 'bake' ? bake(call, args) : waitHealthy(call, args)));
  process.exit(0);
}

function print(list) {
  if (!Array.isArray(list)) {
    if (query === 'status') console.log('  (pm2 not answering)');
    return;
  }
  for (const line of answer(list)) console.log(line);
}

if (query === 'healthy' || query === 'bake') {
  watch(query, process.argv.slice(3));
} else if (fromStdin) {
  let text = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (d) => { text += d; });
  process.stdin.on('end', () => print(parseList(text)));
} else {
  viaDaemon();
}
