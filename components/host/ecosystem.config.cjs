// Managed by cognivern-infra: commit-safe, holds no secrets.
// Secrets reach the processes through shared/run.sh, which exports shared/.env.
module.exports = {
  apps: {{ apps }},
};
