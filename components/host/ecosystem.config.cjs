// Managed by cognivern-infra: commit-safe, holds no secrets.
// shared/run.sh exports shared/.env (set -a) before calling PM2. Naming those variables in each
// app's `env` is what makes `pm2 startOrReload --update-env` hand their *current* values to the
// app: PM2 7 otherwise keeps the environment the app was first started with.
//
// Blue/green: the app runs as two PM2 apps, <appName>-blue on `port` and <appName>-green on
// `port`+1, each in the release directory it was started on. Which release each slot runs (an empty
// slot is not listed, so PM2 runs only what is listed) and which release the agent runs come from
// the slots file, written only by cognivern-release (root's, world-readable: the app cannot change
// it). A host without it (prepared before the slots) runs blue and the agent on `current`.
const fs = require('fs');
const path = require('path');

const SLOTS_FILE = {{ slots_file }};
const RELEASES = {{ releases }};
const CURRENT = {{ current }};
const APP_NAME = {{ app_name }};
const PORT = {{ port }};
const RELEASE_ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

// The variables of shared/.env with their exported values, each marked, and the list of their
// names: env-preload.cjs drops from the app any marked variable that is no longer listed (PM2 keeps
// a variable removed from .env through every reload; see that file).
function sharedEnv() {
  let text = '';
  try {
    text = fs.readFileSync({{ env_file }}, 'utf8');
  } catch (err) {
    return {};
  }
  const env = {};
  const names = [];
  for (const line of text.split('\n')) {
    const match = /^([A-Za-z_][A-Za-z0-9_]*)=/.exec(line);
    if (match && Object.prototype.hasOwnProperty.call(process.env, match[1])) {
      env[match[1]] = process.env[match[1]];
      env[`COGNIVERN_ENV_KEY_${match[1]}`] = '1';
      names.push(match[1]);
    }
  }
  env.COGNIVERN_ENV_KEYS = names.join(' ');
  return env;
}

function readSlots() {
  const slots = {};
  try {
    for (const line of fs.readFileSync(SLOTS_FILE, 'utf8').split('\n')) {
      const match = /^(live|blue|green|agent)=(.*)$/.exec(line);
      if (match) slots[match[1]] = match[2];
    }
    return slots;
  } catch (err) {
    let current = '';
    try {
      current = path.basename(fs.readlinkSync(CURRENT));
    } catch (e) {
      current = '';
    }
    return { live: 'blue', blue: current, green: '', agent: current };
  }
}

function releaseDir(id) {
  return typeof id === 'string' && RELEASE_ID.test(id) ? `${RELEASES}/${id}` : null;
}

const slotApp = {{ app }};
const agents = {{ agents }};
const slots = readSlots();
const apps = [];
for (const [slot, port] of [['blue', PORT], ['green', PORT + 1]]) {
  const cwd = releaseDir(slots[slot]);
  // the slot's PORT comes last: shared/.env holds the blue port for every app
  if (cwd) apps.push({ ...slotApp, name: `${APP_NAME}-${slot}`, cwd, env: { ...slotApp.env, ...sharedEnv(), PORT: String(port) } });
}
const agentDir = releaseDir(slots.agent);
if (agentDir) for (const agent of agents) apps.push({ ...agent, cwd: agentDir, env: { ...agent.env, ...sharedEnv() } });

module.exports = { apps };
