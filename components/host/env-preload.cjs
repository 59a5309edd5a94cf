'use strict';
// Managed by cognivern-infra: commit-safe, holds no secrets. Installed as ROOT/config/env-preload.cjs
// and loaded into every app process before PM2's own wrapper (ecosystem `node_args: --require`).
//
// A variable removed from shared/.env must leave the app at its next graceful reload. PM2 7 cannot do
// that: a reload merges the new environment into the old one (lib/Utility.js `extend` never deletes,
// and lib/God.js `executeApp` copies every variable an app ever had to the top of its pm2_env), so
// the removed variable would live on until the slot is started anew. So the ecosystem marks each
// variable of shared/.env with COGNIVERN_ENV_KEY_<NAME> (PM2 keeps every marker it ever saw, as it
// keeps the variables) and lists the current ones in COGNIVERN_ENV_KEYS. Here, before the app runs,
// every marked variable that is no longer listed is dropped, and the markers and the list with it.
//
// Cluster mode: the worker receives its environment as the JSON in `pm2_env`, which PM2's
// ProcessContainer copies into process.env after this file runs; fork mode (the agent): the
// environment itself. Anything not in that shape is left as it is.
const MARK = 'COGNIVERN_ENV_KEY_';
const LIST = 'COGNIVERN_ENV_KEYS';

function drop(env) {
  if (typeof env[LIST] !== 'string') return; // not an ecosystem that marks: nothing is known
  const current = new Set(env[LIST].split(' ').filter(Boolean));
  for (const key of Object.keys(env)) {
    if (!key.startsWith(MARK)) continue;
    const name = key.slice(MARK.length);
    if (!current.has(name)) delete env[name];
    delete env[key];
  }
  delete env[LIST];
}

try {
  if (process.env.pm2_env) {
    const pm2Env = JSON.parse(process.env.pm2_env);
    if (pm2Env && typeof pm2Env === 'object') {
      drop(pm2Env);
      process.env.pm2_env = JSON.stringify(pm2Env);
    }
  }
  drop(process.env);
} catch (err) {
  // an unreadable pm2_env: PM2's wrapper reports it; the environment stays as PM2 gave it
}
