'use strict';
// Managed by cognivern-infra; installed beside cognivern-release. The release tool's one way to read
// PM2's state and the ecosystem file:
//   node cognivern-pm2.cjs QUERY [NAME]             asks the app's PM2 daemon itself (see below)
//   pm2 jlist | node cognivern-pm2.cjs QUERY [NAME]  the same answer from `pm2 jlist` on stdin
//   node cognivern-pm2.cjs apps ECOSYSTEM           the app names the ecosystem file lists
// An unreadable answer gives no output (restarts, pids, names) or a placeholder line (status),
// never an error: the tool skips that sample or treats it as "not running".
//   restarts NAME  "<sum of restarts> <processes errored or stopped> <processes>" of app NAME
//   pids NAME      pids of NAME's online processes, one a line
//   names          every app name PM2 knows, one a line
//   status         one line per process, for `cognivern-release status`
//   delete NAME    (from PM2 itself only) deletes app NAME like `pm2 delete NAME`; prints the count
//
// Without stdin input (no --stdin) the script sends PM2's own `getMonitorData` call (what `pm2
// jlist` sends) to $PM2_HOME/rpc.sock with the RPC modules of the pm2 package found on PATH: less
// than half the CPU of `pm2 jlist`, which loads all of PM2's CLI (bench/pm2_calls.py: 0.09-0.12 s
// against 0.24-0.28 s on an idle machine, more on a busy one), and the tool asks all through a bake.
// Exit 3: no pm2 package with those modules (ask `pm2 jlist` instead). Exit 4: no daemon listens.
const fs = require('fs');
const path = require('path');

const fromStdin = process.argv.includes('--stdin');
const [query, arg] = process.argv.slice(2).filter((a) => a !== '--stdin');

function answer(list) {
  const mine = list.filter((p) => p.name === arg);
  const env = (p) => p.pm2_env || {};
  switch (query) {
    case 'restarts': {
      const restarts = mine.reduce((n, p) => n + (env(p).restart_time || 0), 0);
      const down = mine.filter((p) => ['errored', 'stopped'].includes(env(p).status)).length;
      return [`${restarts} ${down} ${mine.length}`];
    }
    case 'pids':
      return mine.filter((p) => env(p).status === 'online' && p.pid).map((p) => String(p.pid));
    case 'names':
      return [...new Set(list.map((p) => p.name))];
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

// A query must answer within 3 s (a busy daemon: no answer, the caller skips that sample); a
// delete waits for the processes to stop (PM2's kill_timeout), then the CLI takes over.
async function viaDaemon() {
  const call = await connect();
  if (call === 'missing') process.exit(3);
  if (call === 'down') process.exit(4);
  const giveUp = () => {
    if (query === 'delete') process.exit(3);
    print(null);
    process.exit(0);
  };
  const limit = setTimeout(giveUp, query === 'delete' ? 60000 : 3000);
  try {
    if (query === 'delete') await deleteApp(call);
    else print(await call('getMonitorData', {}));
  } catch (err) {
    giveUp();
  }
  clearTimeout(limit);
  process.exit(0);
}

function print(list) {
  if (!Array.isArray(list)) {
    if (query === 'status') console.log('  (pm2 not answering)');
    return;
  }
  for (const line of answer(list)) console.log(line);
}

if (query === 'apps') {
  let apps = [];
  try {
    apps = require(arg).apps || [];
  } catch (err) {
    console.error(`cognivern-pm2: cannot read ${arg}: ${err.message}`);
  }
  for (const a of apps) console.log(a.name);
} else if (fromStdin) {
  let text = '';
  process.stdin.setEncoding('utf8');
  process.stdin.on('data', (d) => { text += d; });
  process.stdin.on('end', () => {
    let list = null;
    try {
      list = JSON.parse(text);
    } catch (err) {
      list = null;
    }
    print(list);
  });
} else {
  viaDaemon();
}
