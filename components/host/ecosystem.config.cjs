// Managed by cognivern-infra: commit-safe, holds no secrets.
// shared/run.sh exports shared/.env (set -a) before calling PM2. Naming those variables in each
// app's `env` is what makes `pm2 startOrReload --update-env` hand their *current* values to the
// app: PM2 7 otherwise keeps the environment the app was first started with.
const fs = require('fs');

function sharedEnv() {
  let text = '';
  try {
    text = fs.readFileSync({{ env_file }}, 'utf8');
  } catch (err) {
    return {};
  }
  const env = {};
  for (const line of text.split('\n')) {
    const match = /^([A-Za-z_][A-Za-z0-9_]*)=/.exec(line);
    if (match && Object.prototype.hasOwnProperty.call(process.env, match[1])) {
      env[match[1]] = process.env[match[1]];
    }
  }
  return env;
}

const apps = {{ apps }};

module.exports = {
  apps: apps.map((app) => ({ ...app, env: { ...app.env, ...sharedEnv() } })),
};
