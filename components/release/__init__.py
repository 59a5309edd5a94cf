"""The release concern: the Pulumi component (component.py: upload, install, activate over SSH) and
the server-side tool it runs (cognivern-release and its package cognivern_release/, whose fact
module the whole program imports). Kept free of imports here, so `components.release.cognivern_release`
loads without Pulumi (scripts/init and scripts/build-artifact run on any python3)."""
