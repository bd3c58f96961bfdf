"""Speculative decoding: proposers guess each running request's next tokens (drafts); the target
model scores them beside its last token in the same step and the scheduler keeps the ones its
samples confirm (`Scheduler.update`)."""
