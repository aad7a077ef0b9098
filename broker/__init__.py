"""AMQP plumbing: topology, the confirming publisher and the delay ladder."""
