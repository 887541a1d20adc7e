"""daemon: the JSON-RPC server on a Unix socket, its methods, job supervisor and client."""
