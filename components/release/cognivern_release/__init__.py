"""cognivern-release, the server-side release tool, and the facts it shares with the Pulumi program.

Standard library only: provisioning ships these files to the server (components/host
release_tool_bundle) and runs them with the server's python3; the program imports `facts`.
"""
