"""csmstream.transport: ring buffers, the sans-I/O message protocol, the WebSocket server, client.
Never imports torch."""
