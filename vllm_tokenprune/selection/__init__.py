"""How a request's K tokens are chosen: ``methods`` (every method behind one interface),
``selector`` (the learned selector and its checkpoint, as the server loads it) and
``budget`` (the predictor behind ``auto``, its compiled parts in ``budget_kernel``)."""
