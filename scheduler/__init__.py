"""The scheduler process (leader lease, cron, rate tokens, timers).

Not built yet: it arrives with the scheduling issue. Nothing here is imported by the
rest of conveyor until then.
"""
