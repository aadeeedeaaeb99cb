"""The `meshserve` command: `node` (run a node: serve), `local` (a mesh on loopback), `simulate`, and the
management client subcommands (models, aliases, nodes).

At the top: may import anything in meshnode.
"""
