// Managed by cognivern-infra: commit-safe, holds no secrets.
// cognivern-release starts PM2 with shared/.env's variables in its environment (parsed as data: no
// shell sources that file) and their names in COGNIVERN_ENV_KEYS. Naming them in each app's `env` is
// what makes `pm2 startOrReload --update-env` hand their *current* values to the app: PM2 7
// otherwise keeps the environment the app was first started with.
//
// Blue/green: the app runs as two PM2 apps, one per slot, each on its own port and in the release
// directory it was started on. Which release each slot runs (an empty slot is not listed, so PM2
// runs only what is listed) and which release the agent runs come from the tool's state (JSON, root's,
// world-readable: the app cannot change it). A host without it yet runs the first slot and the
// agent on `current`.
const fs = require('fs');
const path = require('path');

const STATE_FILE = {{ state_file }};
const RELEASES = {{ releases }};
const CURRENT = {{ current }};
const SLOTS = {{ slots }};
const RELEASE_ID = new RegExp({{ release_id }});

// A variable removed from shared/.env must leave the app: PM2 7 keeps every variable an app ever had
// through each reload (see env-preload.cjs). So, when cognivern-release is the caller (it sets
// COGNIVERN_ENV_KEYS), each variable is also marked with COGNIVERN_ENV_KEY_<NAME> and the list of
// the current names goes along; env-preload.cjs drops from the app any marked variable that is no
// longer listed. Run by anything else (no list), the ecosystem adds nothing and PM2 keeps the
// environment the app had.
function sharedEnv() {
  const env = {};
  const listed = process.env.COGNIVERN_ENV_KEYS;
  if (typeof listed !== 'string') return env;
  const names = [];
  for (const key of listed.split(' ')) {
    if (key && Object.prototype.hasOwnProperty.call(process.env, key)) {
      env[key] = process.env[key];
      env[`COGNIVERN_ENV_KEY_${key}`] = '1';
      names.push(key);
    }
  }
  env.COGNIVERN_ENV_KEYS = names.join(' ');
  return env;
}

function readSlots() {
  try {
    const state = JSON.parse(fs.readFileSync(STATE_FILE, 'utf8'));
    if (state && typeof state.slots === 'object' && state.slots) return state.slots;
  } catch (err) {
    // no state yet: below
  }
  let current = '';
  try {
    current = path.basename(fs.readlinkSync(CURRENT));
  } catch (err) {
    current = '';
  }
  return { [SLOTS[0].slot]: current, agent: current };
}

function releaseDir(id) {
  return typeof id === 'string' && RELEASE_ID.test(id) ? `${RELEASES}/${id}` : null;
}

const slotApp = {{ app }};
const agents = {{ agents }};
const slots = readSlots();
const apps = [];
for (const { slot, name, port } of SLOTS) {
  const cwd = releaseDir(slots[slot]);
  // the slot's PORT comes last: shared/.env holds the first slot's port for every app
  if (cwd) apps.push({ ...slotApp, name, cwd, env: { ...slotApp.env, ...sharedEnv(), PORT: String(port) } });
}
const agentDir = releaseDir(slots.agent);
if (agentDir) for (const agent of agents) apps.push({ ...agent, cwd: agentDir, env: { ...agent.env, ...sharedEnv() } });

module.exports = { apps };
