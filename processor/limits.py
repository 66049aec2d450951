"""Named upper bounds for every buffer, batch and loop in the daemon.

Units and qualifiers come last in each name. The relations between the bounds are asserted once,
at import, so a change that breaks one fails at start rather than under load.
"""

from typing import Final

# Wire
frame_bytes_max: Final = 8192  # default for `server.max_frame_bytes`
frame_bytes_ceiling: Final = 65535  # what a len2 prefix can express at all
header_bytes_max: Final = 64  # optional fixed-length network header echoed back
# A link sending this many bad messages within the window is closed (a listener's default).
bad_messages_per_window_default: Final = 20
bad_messages_per_window_max: Final = 100_000  # a window of this many times per link at most
bad_message_window_seconds_default: Final = 60.0
# A link's first frame, if it does not decode, is tried in neighbouring dialects to name the
# cause; longer frames are not (processor/wire/dialect.py).
dialect_diagnosis_bytes_max: Final = 2048
# Lines of one kind (undecodable, format error) a link may log at once, then one per interval
# saying how many were left out (processor/log_budget.py).
log_lines_per_kind_burst: Final = 5
log_suppressed_interval_seconds: Final = 60.0
# Links opened and closed by one peer address, logged before the budget applies: a network's
# links come and go a few at a time; a reconnect loop must not fill the log.
log_link_lines_burst: Final = 64
# Peer addresses whose log budgets are kept (the oldest is forgotten past this).
log_budget_addresses_max: Final = 4096

# Server
# Undecided requests a link may have queued: past this, a request is answered 91 at once
# (an advice, which is never refused, pauses the link's reading instead).
in_flight_per_link_max: Final = 1024
# Frames of one link decoded per turn of the event loop: a link that sent more in one read
# waits, reading paused, for the next turn, so a flood on one link cannot hold up the others.
frames_per_turn_max: Final = 256
# ... and at most about this long (checked every frames_per_chunk frames): a turn's frames cost
# from 2 us (an echo) to tens (a request decoded, queued or refused, a bad message logged).
turn_seconds_max: Final = 0.001
frames_per_chunk: Final = 32
# Admission: a request is answered 91 at once when the queue ahead of it would take longer than
# this share of server.decision_deadline_seconds to decide, at the measured time per request.
admission_deadline_share: Final = 0.8
links_max: Final = 1024
# Connections accepted per wake-up of a listening socket (processor/server/acceptor.py), then the
# loop serves what it has; and the pause before accepting again after an error accept() could
# not shed (asyncio's own ACCEPT_RETRY_DELAY is 1 s too).
accepts_per_wakeup_max: Final = 128
accept_retry_seconds: Final = 1.0
link_supervision_interval_seconds: Final = 1.0  # how often idle and stalled links are looked for
# Open files asked for when the hard limit is unlimited (the kernel caps it at nr_open anyway).
open_files_wanted: Final = 65536
write_buffer_high_bytes: Final = 1 << 20  # pause reading a link whose peer stops reading
shutdown_drain_seconds_max: Final = 10.0
# Worker processes (server.workers): each serves links with its own event loop and GIL and
# commits through the one LMDB environment, whose writer lock serialises their transactions.
workers_max: Final = 16
worker_start_seconds_max: Final = 30.0  # a worker that is not ready by then fails the start
worker_report_seconds: Final = 1.0  # how often a worker sends its metrics to the primary
worker_restarts_per_minute_max: Final = (
    5  # past this a crashing child rests till the minute allows one
)
# The webhook delivery process reports its metrics this often: how stale its part of /metrics
# (backlog, delivery time, failures) may be.
delivery_report_seconds: Final = 0.25
# A child that reported ready and then sends no report for this long is hung (a deadlock, a
# stuck system call, SIGSTOP): killed and started again. A hung worker's share of new links
# (SO_REUSEPORT) went unanswered while every probe said healthy. Ten reports a worker misses.
child_report_silence_seconds_max: Final = 10.0
# The delivery process's niceness above the daemon's: on busy cores the scheduler gives the
# authorisation loop about 3x its share (Linux CFS weights 1024 against 335).
delivery_nice: Final = 5
# The highest CPU number server.cpus and webhooks.delivery_cpus accept (Linux's CONFIG_NR_CPUS
# goes to 8192): a larger one would only make Python allocate a huge affinity mask.
cpu_id_max: Final = 8191
delivery_wake_bytes_max: Final = 4096  # wakes read at once (each is one committed batch)
worker_report_bytes_max: Final = 4 << 20  # a report larger than this is a bug: worker dropped

# Peer addresses whose bad link closes are remembered (processor/server/bad_peers.py), and the
# most closes an address's limit may count (each address keeps at most that many times).
bad_peer_addresses_max: Final = 4096
bad_links_per_address_ceiling: Final = 10_000

# Group commit
batch_size_max: Final = 256  # requests decided and applied in one LMDB write transaction
# The fewest requests a time-bounded batch is cut to (server.batch_seconds_max): below this the
# fsync per batch costs more throughput than the shorter wait gains anyone.
batch_size_min: Final = 8
# A light link: one that queued a request within light_link_seconds and has at most
# light_link_in_flight_max in flight. Batches are bounded in time only while one is about
# (Daemon._batch_size), looked for at most every light_links_check_seconds.
light_link_seconds: Final = 1.0
light_link_in_flight_max: Final = 8
light_links_check_seconds: Final = 0.05
# ... and only once the queue has been longer than a time-bounded batch for this long.
saturated_seconds_min: Final = 0.1
# A batch that takes a light link's request beside a busy link's is cut to this many (fewer
# than logged_batch_requests_max while the ledger logs: Daemon._light_batch_size).
light_batch_size: Final = 8
# ... and while a light link is about but has nothing queued, a batch of a greedy link's
# requests (one with more than greedy_link_in_flight_min in flight) is bounded to this time (or
# server.batch_seconds_max if less): the light link's next request, arriving during it, waits
# for it. Not for any link past light_link_in_flight_max: at 5,000/s over 8 links, links pass 8
# in a moment's hiccup, and the shorter batches then made it last (bench/RESULTS.md, 2026-12-07
# seventh session).
light_batch_seconds: Final = 0.001
greedy_link_in_flight_min: Final = 64
# While the last batch protected a light link (either of the two cuts above), a link's turn of
# reading is bounded to this instead of turn_seconds_max: the light link's request, read in the
# same turn of the loop, waits for the busy link's share first.
light_turn_seconds_max: Final = 0.0005

# Control-API changes applied in one write transaction, ahead of that batch's requests.
commands_per_batch_max: Final = 64

# Hold expiry: holds released per sweep transaction; a backlog is worked off a batch at a time
# so one sweep never holds the event loop for long.
sweep_holds_max: Final = 64  # about 2 ms of work: batches release most holds (above)

# Holds released in a batch's transaction, per change the batch made: more than it can open,
# so expiry keeps up at any rate without a transaction (and an fsync) of its own.
expiry_per_change: Final = 2

# Retention (issue 12): records visited per database in one sweep step. Steps ride in the
# batches' transactions, at most one every `retention_step_seconds` (neighbouring deletes then
# share their pages' copies), with the visits the ledger's new events earned since the last
# step: every process's events, so the sweep keeps up with worker processes too. Two visits per
# event: every request and every expiry makes one, and a request adds one answer, so the
# outbox is cut and the answers' clock hand goes round faster than they grow. A visit costs
# about 1.5 us, a record pruned 2.6 (bench/retention_cost.py). A step spends what the new
# events earned (in proportion to its batches), plus at most `retention_visits_step_max` of
# what earlier steps left owed, and never more than the ceiling.
# When no batch ran in this process for a second (all links on worker processes, or no
# traffic), steps run in transactions of their own, every `retention_busy_seconds` while they
# find work, with at least the idle budget.
retention_visits_per_event: Final = 2
retention_visits_min: Final = 4
retention_visits_step_max: Final = 512  # of what earlier steps left owed, per step
retention_visits_step_ceiling: Final = 4096  # in one step at most: about 10 ms
retention_step_seconds: Final = 0.002
retention_visits_idle: Final = 256
# The card details page: a client address refused this often within a minute is refused
# without a look at the ledger until the minute has passed; addresses remembered at most.
reveal_refusals_per_minute_max: Final = 20
reveal_addresses_remembered_max: Final = 10_000
# Records are kept in commit order, stamped with a clock read earlier (a worker's, before LMDB's
# writer lock: a batch or two, at worst the requests' deadline of 1.5 s). Retention keeps the
# answers this much older than the oldest event kept (an event behind it stamped earlier), and
# a history walk takes an answer this much newer than the step before as still its own. Not
# more: with short horizons every second kept is live data (a clock stepped back further
# loses those events' facts from their answers; the events keep their own).
event_order_skew_ms: Final = 2_000
# How far behind the ledger's clock (meta clock_ms) the wall clock may be and still be waited
# for (Writer.ledger_time): an NTP step or a restored VM, seconds to minutes. Further behind,
# the ledger's clock was the wrong one (set ahead once): waiting for the wall clock would stop
# usage windows, hold expiry and card expiry for as long; the wall clock is followed instead.
ledger_clock_held_max_ms: Final = 3_600_000
retention_idle_seconds: Final = 1.0
retention_busy_seconds: Final = 0.01
retention_failure_pause_seconds: Final = 60  # after a failed step (a bug): logged once a minute
delivery_floor_refresh_seconds: Final = 1.0  # the webhooks' delivery positions, read again

# Approval codes: drawn at random, unlike the card's codes of the same day; a card approved
# more often than this in a day is kept unlike its first ones only (kept in its state).
approval_codes_remembered_max: Final = 1000
approval_code_draws_max: Final = 64  # at most 1000 of 10^6 taken: 64 collisions in a row is a bug

# Secrets checked at start (outside --demo)
pan_key_bytes_min: Final = 32  # the PAN-hashing HMAC-SHA256 key: at least its output size
api_token_chars_min: Final = 16  # the control API's bearer token

# Ledger
map_size_bytes_default: Final = 1 << 30
# The map grows by itself (doubling) up to ledger.map_size_max_bytes: address space is reserved,
# the file grows only as pages are used. Past this, answers are 96 ledger_full.
map_size_max_bytes_default: Final = 64 << 30
# A write-ahead log smaller than this holds too few batches between checkpoints to be worth it.
write_ahead_log_bytes_min: Final = 64 << 10
# A batch of this many requests and commands or more commits through LMDB rather than the
# write-ahead log: its LMDB commit is shared by several requests already, and logging it ahead
# adds a flush and soon a checkpoint. The log pays where commits are lone (the quiet hours).
# Measured (bench/RESULTS.md, 2026-12-07 eighth session): at 64, a webhook endpoint at 5,000/s
# (batches of about 10) got its events at each checkpoint, 25 at a time, and the bursts raised
# the authorisations' p50 to 2.7-3.3 ms; at 4 that rate commits as before (2.1 ms).
logged_batch_requests_max: Final = 4
# Of the ceiling in use: a warning (and the gauges to alert on) at the first, /readyz degraded at
# the second.
map_used_warning_ratio: Final = 0.8
map_used_degraded_ratio: Final = 0.9
map_used_full_ratio: Final = 0.999  # /readyz 503 from here, whichever process's batches found it
ledger_databases_max: Final = 32
account_id_bytes_max: Final = 64
holds_listed_max: Final = 1000  # `ledger show` lists at most this many holds
# Listing an account's open holds walks its answers back to the oldest open hold; holds expire
# within weeks, so this bounds a listing of a very busy account, never a decision.
history_walk_max: Final = 1_000_000

# Webhooks
# Signing secrets per endpoint: every delivery carries one signature per secret, so a rotation
# (old and new side by side) needs two; more only lengthen every request.
webhook_secrets_per_endpoint_max: Final = 4

# Simulator
sim_connections_max: Final = 64
sim_rate_per_second_max: Final = 50_000
sim_duration_seconds_max: Final = 600.0

assert frame_bytes_max <= frame_bytes_ceiling
assert header_bytes_max < frame_bytes_max
assert batch_size_max <= in_flight_per_link_max
assert light_link_in_flight_max < greedy_link_in_flight_min <= in_flight_per_link_max
assert light_turn_seconds_max <= turn_seconds_max
assert logged_batch_requests_max >= 2  # a light link's batch is cut to one less
assert links_max >= sim_connections_max

# Card verification keys one card range may list at once (the issuing key and older ones
# whose cards are still in use).
card_verification_keys_per_range_max: Final = 4
# An account's posted balance never goes above this many minor units: a funding or a refund
# that would take it higher is refused. Far beyond any real account (10^16 euros), and far
# below what the account record's 64-bit integers hold: past them, the batch that wrote it
# failed, and every authorisation in it was answered 96.
account_posted_max: Final = 10**18

# Bounds of the configuration's durations and of the write-ahead log's preallocated size.
config_seconds_max: Final = 10 * 366 * 86400
write_ahead_log_bytes_max: Final = 1 << 30
