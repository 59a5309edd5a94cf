'use strict';
// Managed by cognivern-infra; installed beside cognivern-release. The release tool's one way to read
// PM2's state and the ecosystem file: `pm2 jlist | node cognivern-pm2.cjs QUERY [NAME]`, or
// `node cognivern-pm2.cjs apps ECOSYSTEM`. Unreadable input gives the empty answer, never an error:
// the tool treats "no answer" as "not running".
//   restarts NAME  "<sum of restarts> <processes errored or stopped> <processes>" of app NAME
//   pids NAME      pids of NAME's online processes, one a line
//   names          every app name PM2 knows, one a line
//   status         one line per process, for `cognivern-release status`
//   apps ECO       the app names the ecosystem file lists, one a line
const [query, arg] = process.argv.slice(2);

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

if (query === 'apps') {
  let apps = [];
  try {
    apps = require(arg).apps || [];
  } catch (err) {
    console.error(`cognivern-pm2: cannot read ${arg}: ${err.message}`);
  }
  for (const a of apps) console.log(a.name);
} else {
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
    if (!Array.isArray(list)) {
      if (query === 'restarts') console.log('0 0 0');
      if (query === 'status') console.log('  (pm2 not answering)');
      return;
    }
    for (const line of answer(list)) console.log(line);
  });
}
