/* The per-frame loops no array code can do: walking chains of length-prefixed records (where each
 * record starts depends on the length in the one before it), and collecting the frames libpcap hands
 * over one callback at a time. Built by scripts/install.sh (or by `pip install .`, pyproject.toml);
 * exporter/walk.py and exporter/libpcap.py load it with ctypes and fall back to the same loops in
 * Python when it is missing. */
#include <stdint.h>
#include <string.h>
#include <sys/time.h>

static inline uint32_t load32(const uint8_t *at, int swapped) {
    uint32_t value;
    memcpy(&value, at, 4);
    return swapped ? __builtin_bswap32(value) : value;
}

/* Classic pcap records from byte `position` of buf[0:size): the offset of each record header into
 * `offsets`, at most `limit` of them, stopping before a record that does not end inside the buffer.
 * Returns how many; *next is where the walk stopped. A captured length above `max_captured` means a
 * corrupt file: the walk stops there and returns -1 - (records before it). */
long pcap_records(const uint8_t *buf, long size, long position, int swapped, long limit,
                  uint32_t max_captured, int64_t *offsets, long *next) {
    long count = 0;
    while (count < limit && position + 16 <= size) {
        uint32_t captured = load32(buf + position + 8, swapped);
        if (captured > max_captured) {
            *next = position;
            return -1 - count;
        }
        if (position + 16 + (long)captured > size)
            break;
        __builtin_prefetch(buf + position + 2048);  /* the walk is bound by memory latency */
        offsets[count++] = position;
        position += 16 + (long)captured;
    }
    *next = position;
    return count;
}

/* `count` records from `first`, each starting with the 32-bit (native order) distance to the next:
 * the frames of a TPACKET_V3 ring block. */
void chained_records(const uint8_t *buf, long first, long count, int64_t *offsets) {
    long position = first;
    for (long index = 0; index < count; index++) {
        offsets[index] = position;
        position += load32(buf + position, 0);
    }
}

/* libpcap's pcap_pkthdr */
struct packet_header {
    struct timeval ts;
    uint32_t captured;
    uint32_t length;
};

/* Where collect_frame puts the frames of one pcap_dispatch: their bytes one after the other, and
 * per frame its start, end, length on the wire and timestamp. */
struct collected {
    uint8_t *data;
    long capacity;
    long used;
    long limit;
    long count;
    int64_t *starts;
    int64_t *ends;
    int64_t *wire_lengths;
    double *timestamps;
};

/* A pcap_handler: copies each frame libpcap hands over into a `struct collected` (the user
 * argument), so that a whole dispatch is collected without calling back into Python. A frame that
 * does not fit (the caller asks for no more than fit) is left out. */
void collect_frame(uint8_t *user, const struct packet_header *header, const uint8_t *bytes) {
    struct collected *into = (struct collected *)user;
    if (into->count >= into->limit || into->used + (long)header->captured > into->capacity)
        return;
    memcpy(into->data + into->used, bytes, header->captured);
    into->starts[into->count] = into->used;
    into->ends[into->count] = into->used + header->captured;
    into->wire_lengths[into->count] = header->length;
    into->timestamps[into->count] = (double)header->ts.tv_sec + (double)header->ts.tv_usec / 1e6;
    into->used += header->captured;
    into->count++;
}

/* TCP connection state for TCP health (exporter/tcpflows.py owns the arrays and runs the same
 * algorithm in Python when this library is missing). One flow per (client address, server address,
 * client port, server port): a fixed-capacity open-addressing hash table with linear probing and
 * backward-shift deletion, plus an exact LRU list (prev/next flow indices); a new flow in a full
 * table evicts the least recently seen one. Flow indices are handed out in order, then reused from
 * evicted flows, so no free list is needed. */
#define TCP_HOLES 4
#define HOLE_ROOM (TCP_HOLES + 1)  /* one more while a hole is added or split, before trimming */
#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_ACK 0x10
#define STAGE_NONE 0
#define STAGE_SYN 1
#define STAGE_SYN_ACK 2
#define EVENT_SEGMENT 1
#define EVENT_RETRANSMISSION 2
#define EVENT_HANDSHAKE 4
#define EVENT_RTT 8
#define NO_TIME INT64_MIN

struct flow_table {
    int64_t capacity, slots, count, head, tail, evictions, unmeasured;
    int32_t *slot_flow;            /* slots: flow index, -1 empty */
    uint64_t *keys;                /* capacity x 5: client hi, client lo, server hi, server lo, family|ports */
    int32_t *prev, *next;          /* LRU: head is the most recently seen */
    uint8_t *stage;
    uint32_t *client_isn, *server_isn;
    int64_t *synack_time;
    uint8_t *started;              /* capacity x 2 (direction): a sequence number was seen */
    uint32_t *high;                /* capacity x 2: the highest sequence number seen + 1 */
    uint8_t *hole_count;           /* capacity x 2 */
    uint32_t *holes;               /* capacity x 2 x HOLE_ROOM x 2: [start, end) not yet seen */
};

static inline uint64_t flow_hash(const uint64_t *key) {
    uint64_t h = key[0] * 0x9E3779B97F4A7C15ULL ^ key[1] * 0xC2B2AE3D27D4EB4FULL ^ key[2] * 0x165667B19E3779F9ULL
                 ^ key[3] * 0xD6E8FEB86659FD93ULL ^ key[4] * 0xFF51AFD7ED558CCDULL;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 32);
}

static int64_t flow_find(const struct flow_table *t, const uint64_t *key, int64_t *slot_out) {
    int64_t mask = t->slots - 1, slot = (int64_t)(flow_hash(key) & (uint64_t)mask);
    for (;;) {
        int32_t flow = t->slot_flow[slot];
        if (flow < 0) {
            *slot_out = slot;
            return -1;
        }
        const uint64_t *stored = t->keys + 5 * (int64_t)flow;
        if (stored[0] == key[0] && stored[1] == key[1] && stored[2] == key[2] && stored[3] == key[3]
            && stored[4] == key[4]) {
            *slot_out = slot;
            return flow;
        }
        slot = (slot + 1) & mask;
    }
}

static void lru_unlink(struct flow_table *t, int32_t flow) {
    int32_t p = t->prev[flow], n = t->next[flow];
    if (p >= 0) t->next[p] = n; else t->head = n;
    if (n >= 0) t->prev[n] = p; else t->tail = p;
}

static void lru_push(struct flow_table *t, int32_t flow) {
    t->prev[flow] = -1;
    t->next[flow] = (int32_t)t->head;
    if (t->head >= 0) t->prev[t->head] = flow; else t->tail = flow;
    t->head = flow;
}

static void flow_touch(struct flow_table *t, int32_t flow) {
    if (t->head != flow) {
        lru_unlink(t, flow);
        lru_push(t, flow);
    }
}

/* Backward-shift deletion keeps every probe chain unbroken without tombstones. */
static void slot_delete(struct flow_table *t, int64_t slot) {
    int64_t mask = t->slots - 1, hole = slot, next = (slot + 1) & mask;
    while (t->slot_flow[next] >= 0) {
        int64_t home = (int64_t)(flow_hash(t->keys + 5 * (int64_t)t->slot_flow[next]) & (uint64_t)mask);
        if (((next - home) & mask) >= ((next - hole) & mask)) {
            t->slot_flow[hole] = t->slot_flow[next];
            hole = next;
        }
        next = (next + 1) & mask;
    }
    t->slot_flow[hole] = -1;
}

static void flow_reset(struct flow_table *t, int32_t flow) {
    t->stage[flow] = STAGE_NONE;
    t->started[2 * flow] = t->started[2 * flow + 1] = 0;
    t->hole_count[2 * flow] = t->hole_count[2 * flow + 1] = 0;
}

/* A new flow for `key` (not in the table; `slot` is where the failed lookup ended). */
static int32_t flow_insert(struct flow_table *t, const uint64_t *key, int64_t slot) {
    int32_t flow;
    if (t->count < t->capacity) {
        flow = (int32_t)t->count++;
    } else {
        int64_t old_slot;
        flow = (int32_t)t->tail;
        if (t->stage[flow] != STAGE_NONE)
            t->unmeasured++;
        t->evictions++;
        flow_find(t, t->keys + 5 * (int64_t)flow, &old_slot);
        lru_unlink(t, flow);
        slot_delete(t, old_slot);
        flow_find(t, key, &slot);  /* the deletion may have moved the free slot */
    }
    memcpy(t->keys + 5 * (int64_t)flow, key, 5 * sizeof(uint64_t));
    t->slot_flow[slot] = flow;
    lru_push(t, flow);
    flow_reset(t, flow);
    return flow;
}

static inline int32_t relative(uint32_t value, uint32_t high) { return (int32_t)(value - high); }

/* Drop the hole starting lowest (furthest behind) when there are more than TCP_HOLES. */
static void holes_trim(uint32_t *holes, uint8_t *count, uint32_t high) {
    if (*count <= TCP_HOLES)
        return;
    int lowest = 0;
    for (int i = 1; i < *count; i++)
        if (relative(holes[2 * i], high) < relative(holes[2 * lowest], high))
            lowest = i;
    holes[2 * lowest] = holes[2 * (*count - 1)];
    holes[2 * lowest + 1] = holes[2 * (*count - 1) + 1];
    (*count)--;
}

/* Remove [start, end) from the holes (relative to `high`); whether it overlapped any. */
static int holes_fill(uint32_t *holes, uint8_t *count, uint32_t start, uint32_t end, uint32_t high) {
    int overlapped = 0;
    int32_t s = relative(start, high), e = relative(end, high);
    int n = *count;
    for (int i = 0; i < n; i++) {
        int32_t hs = relative(holes[2 * i], high), he = relative(holes[2 * i + 1], high);
        if (!(s < he && hs < e))
            continue;
        overlapped = 1;
        uint32_t hole_end = holes[2 * i + 1];
        if (s > hs && e < he) {  /* split in two: the right piece goes last */
            holes[2 * i + 1] = start;
            holes[2 * *count] = end;
            holes[2 * *count + 1] = hole_end;
            (*count)++;
        } else if (s > hs) {
            holes[2 * i + 1] = start;
        } else if (e < he) {
            holes[2 * i] = end;
        } else {  /* covered: remove, and look at the hole moved into place i again */
            holes[2 * i] = holes[2 * (*count - 1)];
            holes[2 * i + 1] = holes[2 * (*count - 1) + 1];
            (*count)--;
            if (*count < n) {
                n--;
                i--;
            }
        }
    }
    holes_trim(holes, count, high);
    return overlapped;
}

/* A payload segment [seq, seq + length) in one direction: EVENT_SEGMENT, with EVENT_RETRANSMISSION
 * when its whole range was already seen, or 0 for a keep-alive. */
static uint8_t segment(struct flow_table *t, int64_t at, uint32_t seq, uint32_t length) {
    uint32_t end = seq + length;
    uint32_t *holes = t->holes + at * HOLE_ROOM * 2;
    if (!t->started[at]) {
        t->started[at] = 1;
        t->high[at] = end;
        t->hole_count[at] = 0;
        return EVENT_SEGMENT;
    }
    uint32_t high = t->high[at];
    if (length <= 1 && high - seq == 1)
        return 0;
    if (relative(end, high) > 0) {
        if (relative(seq, high) > 0) {
            holes[2 * t->hole_count[at]] = high;
            holes[2 * t->hole_count[at] + 1] = seq;
            t->hole_count[at]++;
        } else {
            holes_fill(holes, &t->hole_count[at], seq, high, high);
        }
        t->high[at] = end;
        holes_trim(holes, &t->hole_count[at], end);
        return EVENT_SEGMENT;
    }
    if (holes_fill(holes, &t->hole_count[at], seq, end, high))
        return EVENT_SEGMENT;
    return EVENT_SEGMENT | EVENT_RETRANSMISSION;
}

/* Track `count` TCP frames in capture order. keys: count x 5 (see struct flow_table); direction 0
 * in (client to server), 1 out; times in ns (NO_TIME: unknown). Per frame, events (EVENT_* bits) and,
 * with EVENT_RTT, the handshake's round trip in ns. */
void tcp_track(struct flow_table *t, long count, const uint64_t *keys, const uint8_t *direction,
               const uint8_t *flags, const uint32_t *seq, const uint32_t *ack, const uint32_t *payload,
               const int64_t *times, uint8_t *events, int64_t *rtt) {
    for (long i = 0; i < count; i++) {
        const uint64_t *key = keys + 5 * i;
        int64_t slot;
        int32_t flow = (int32_t)flow_find(t, key, &slot);
        uint8_t f = flags[i], d = direction[i], found = 0;
        events[i] = 0;
        if (f & TCP_SYN) {
            if (d == 0 && !(f & TCP_ACK)) {
                if (flow < 0)
                    flow = flow_insert(t, key, slot);
                else
                    flow_touch(t, flow);
                if (t->stage[flow] == STAGE_NONE || t->client_isn[flow] != seq[i]) {
                    flow_reset(t, flow);
                    t->stage[flow] = STAGE_SYN;
                    t->client_isn[flow] = seq[i];
                    t->started[2 * flow] = 1;
                    t->high[2 * flow] = seq[i] + 1;
                }
            } else if (d == 1 && (f & TCP_ACK) && flow >= 0) {
                flow_touch(t, flow);
                if (t->stage[flow] != STAGE_NONE && ack[i] == t->client_isn[flow] + 1) {
                    t->stage[flow] = STAGE_SYN_ACK;
                    t->server_isn[flow] = seq[i];
                    t->synack_time[flow] = times[i];
                    t->started[2 * flow + 1] = 1;
                    t->high[2 * flow + 1] = seq[i] + 1;
                    t->hole_count[2 * flow + 1] = 0;
                }
            }
            continue;
        }
        if (flow < 0) {
            if (payload[i] == 0)
                continue;
            flow = flow_insert(t, key, slot);
        } else {
            flow_touch(t, flow);
            found = 1;
        }
        if (found && t->stage[flow] == STAGE_SYN_ACK && d == 0 && (f & TCP_ACK)
            && ack[i] == t->server_isn[flow] + 1) {
            t->stage[flow] = STAGE_NONE;
            events[i] = EVENT_HANDSHAKE;
            if (times[i] != NO_TIME && t->synack_time[flow] != NO_TIME) {
                int64_t elapsed = times[i] - t->synack_time[flow];
                rtt[i] = elapsed > 0 ? elapsed : 0;
                events[i] |= EVENT_RTT;
            }
        }
        if (payload[i] > 0)
            events[i] |= segment(t, 2 * (int64_t)flow + d, seq[i], payload[i]);
    }
}
