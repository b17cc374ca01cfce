"""How a request's K tokens are chosen: ``methods`` (every method behind one interface)
and ``selector`` (the learned selector and its checkpoint, as the server loads it)."""
