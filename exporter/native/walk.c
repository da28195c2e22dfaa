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
 * corrupt file: the walk stops there and returns -1 - (records before it). With `times` (else NULL),
 * each record's time in seconds: its seconds plus its fraction in `units` per second. */
long pcap_records(const uint8_t *buf, long size, long position, int swapped, long limit,
                  uint32_t max_captured, int64_t *offsets, long *next, double *times, double units) {
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
        if (times != NULL)
            times[count] = (double)load32(buf + position, swapped) + (double)load32(buf + position + 4, swapped) / units;
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

/* TCP connection state for TCP health (exporter/tcpflows.py owns the memory and runs the same
 * algorithm in Python when this library is missing). One flow per (client address, server address,
 * client port, server port): a fixed-capacity open-addressing hash table with linear probing and
 * backward-shift deletion, plus an exact LRU list (prev/next flow indices); a new flow in a full
 * table evicts the least recently seen one. Flow indices are handed out in order, then reused from
 * evicted flows, so no free list is needed.
 *
 * The worst case (every segment a new flow) is bound by memory latency, so the layout is chosen
 * for few cache misses: a slot holds the key's hash and the flow index in one word (probes and
 * deletion read no flow), and a flow's state is one 192-byte record whose first cache line holds
 * everything most frames touch. */
#define TCP_HOLES 4
#define HOLE_ROOM (TCP_HOLES + 1)  /* one more while a hole is added or split, before trimming */
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10
#define STAGE_NONE 0
#define STAGE_SYN 1
#define STAGE_SYN_ACK 2
#define EVENT_SEGMENT 1
#define EVENT_RETRANSMISSION 2
#define EVENT_HANDSHAKE 4
#define EVENT_RTT 8
#define EVENT_RESET 16
#define NO_TIME INT64_MIN

struct flow {
    /* first cache line */
    uint64_t key[5];  /* client hi, client lo, server hi, server lo, family << 32 | client port << 16 | server port */
    int32_t prev, next;  /* LRU: head is the most recently seen */
    uint32_t high[2];  /* per direction (0 in, 1 out): the highest sequence number seen + 1 */
    uint8_t stage, started[2], hole_count[2];
    /* second and third */
    uint32_t client_isn, server_isn;
    int64_t synack_time;
    uint32_t holes[2][HOLE_ROOM][2];  /* [start, end) not yet seen, below high */
} __attribute__((aligned(64)));

struct flow_table {
    int64_t capacity, slots, count, head, tail, evictions, unmeasured;
    uint64_t *slot;      /* slots: hash << 32 | flow index + 1; 0 empty */
    struct flow *flows;  /* capacity, 64-byte aligned */
};

static inline uint32_t flow_hash(const uint64_t *key) {
    uint64_t h = key[0] * 0x9E3779B97F4A7C15ULL ^ key[1] * 0xC2B2AE3D27D4EB4FULL ^ key[2] * 0x165667B19E3779F9ULL
                 ^ key[3] * 0xD6E8FEB86659FD93ULL ^ key[4] * 0xFF51AFD7ED558CCDULL;
    h ^= h >> 29;
    h *= 0xBF58476D1CE4E5B9ULL;
    return (uint32_t)(h ^ (h >> 32));
}

/* The flow of `key` (hash `hash`), or -1 with *slot_out where it would go. */
static int32_t flow_find(const struct flow_table *t, const uint64_t *key, uint32_t hash, int64_t *slot_out) {
    int64_t mask = t->slots - 1, slot = hash & mask;
    for (;;) {
        uint64_t entry = t->slot[slot];
        if (entry == 0) {
            *slot_out = slot;
            return -1;
        }
        if ((uint32_t)(entry >> 32) == hash) {
            int32_t flow = (int32_t)(entry & 0xFFFFFFFF) - 1;
            const uint64_t *stored = t->flows[flow].key;
            if (stored[0] == key[0] && stored[1] == key[1] && stored[2] == key[2] && stored[3] == key[3]
                && stored[4] == key[4]) {
                *slot_out = slot;
                return flow;
            }
        }
        slot = (slot + 1) & mask;
    }
}

static void lru_unlink(struct flow_table *t, int32_t flow) {
    int32_t p = t->flows[flow].prev, n = t->flows[flow].next;
    if (p >= 0) t->flows[p].next = n; else t->head = n;
    if (n >= 0) t->flows[n].prev = p; else t->tail = p;
}

static void lru_push(struct flow_table *t, int32_t flow) {
    t->flows[flow].prev = -1;
    t->flows[flow].next = (int32_t)t->head;
    if (t->head >= 0) t->flows[t->head].prev = flow; else t->tail = flow;
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
    while (t->slot[next] != 0) {
        int64_t home = (int64_t)(t->slot[next] >> 32) & mask;
        if (((next - home) & mask) >= ((next - hole) & mask)) {
            t->slot[hole] = t->slot[next];
            hole = next;
        }
        next = (next + 1) & mask;
    }
    t->slot[hole] = 0;
}

static void flow_reset(struct flow *f) {
    f->stage = STAGE_NONE;
    f->started[0] = f->started[1] = 0;
    f->hole_count[0] = f->hole_count[1] = 0;
}

/* A new flow for `key` (not in the table; `slot` is where the failed lookup ended). */
static int32_t flow_insert(struct flow_table *t, const uint64_t *key, uint32_t hash, int64_t slot) {
    int32_t flow;
    if (t->count < t->capacity) {
        flow = (int32_t)t->count++;
    } else {
        flow = (int32_t)t->tail;
        struct flow *old = &t->flows[flow];
        if (old->stage != STAGE_NONE)
            t->unmeasured++;
        t->evictions++;
        uint32_t old_hash = flow_hash(old->key);
        uint64_t entry = (uint64_t)old_hash << 32 | (uint64_t)(flow + 1);
        int64_t mask = t->slots - 1, old_slot = old_hash & mask;
        while (t->slot[old_slot] != entry)
            old_slot = (old_slot + 1) & mask;
        lru_unlink(t, flow);
        if (t->tail >= 0)
            __builtin_prefetch(&t->flows[t->tail]);  /* the next to go */
        slot_delete(t, old_slot);
        flow_find(t, key, hash, &slot);  /* the deletion may have moved the free slot */
    }
    memcpy(t->flows[flow].key, key, 5 * sizeof(uint64_t));
    t->slot[slot] = (uint64_t)hash << 32 | (uint64_t)(flow + 1);
    lru_push(t, flow);
    flow_reset(&t->flows[flow]);
    return flow;
}

static inline int32_t relative(uint32_t value, uint32_t high) { return (int32_t)(value - high); }

/* Drop the hole starting lowest (furthest behind) when there are more than TCP_HOLES. */
static void holes_trim(uint32_t (*holes)[2], uint8_t *count, uint32_t high) {
    if (*count <= TCP_HOLES)
        return;
    int lowest = 0;
    for (int i = 1; i < *count; i++)
        if (relative(holes[i][0], high) < relative(holes[lowest][0], high))
            lowest = i;
    holes[lowest][0] = holes[*count - 1][0];
    holes[lowest][1] = holes[*count - 1][1];
    (*count)--;
}

/* Remove [start, end) from the holes (relative to `high`); whether it overlapped any. */
static int holes_fill(uint32_t (*holes)[2], uint8_t *count, uint32_t start, uint32_t end, uint32_t high) {
    int overlapped = 0;
    int32_t s = relative(start, high), e = relative(end, high);
    int n = *count;
    for (int i = 0; i < n; i++) {
        int32_t hs = relative(holes[i][0], high), he = relative(holes[i][1], high);
        if (!(s < he && hs < e))
            continue;
        overlapped = 1;
        uint32_t hole_end = holes[i][1];
        if (s > hs && e < he) {  /* split in two: the right piece goes last */
            holes[i][1] = start;
            holes[*count][0] = end;
            holes[*count][1] = hole_end;
            (*count)++;
        } else if (s > hs) {
            holes[i][1] = start;
        } else if (e < he) {
            holes[i][0] = end;
        } else {  /* covered: remove, and look at the hole moved into place i again */
            holes[i][0] = holes[*count - 1][0];
            holes[i][1] = holes[*count - 1][1];
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

/* A payload segment [seq, seq + length) in direction d: EVENT_SEGMENT, with EVENT_RETRANSMISSION
 * when its whole range was already seen, or 0 for a keep-alive. */
static uint8_t segment(struct flow *f, int d, uint32_t seq, uint32_t length) {
    uint32_t end = seq + length;
    uint32_t (*holes)[2] = f->holes[d];
    if (!f->started[d]) {
        f->started[d] = 1;
        f->high[d] = end;
        f->hole_count[d] = 0;
        return EVENT_SEGMENT;
    }
    uint32_t high = f->high[d];
    if (length <= 1 && high - seq == 1)
        return 0;
    if (relative(end, high) > 0) {
        if (relative(seq, high) > 0) {
            holes[f->hole_count[d]][0] = high;
            holes[f->hole_count[d]][1] = seq;
            f->hole_count[d]++;
        } else {
            holes_fill(holes, &f->hole_count[d], seq, high, high);
        }
        f->high[d] = end;
        holes_trim(holes, &f->hole_count[d], end);
        return EVENT_SEGMENT;
    }
    if (holes_fill(holes, &f->hole_count[d], seq, end, high))
        return EVENT_SEGMENT;
    return EVENT_SEGMENT | EVENT_RETRANSMISSION;
}

/* One frame's effect on its flow: EVENT_* bits, and the handshake's round trip in *rtt. `d` is the
 * direction (0: in, client to server). */
static uint8_t track_frame(struct flow_table *t, const uint64_t *key, uint32_t hash, uint8_t d, uint8_t flags,
                           uint32_t seq, uint32_t ack, uint32_t payload, int64_t time, int64_t *rtt) {
    int64_t slot;
    int32_t index = flow_find(t, key, hash, &slot);
    uint8_t events = 0;
    if (flags & TCP_SYN) {
        if (d == 0 && !(flags & TCP_ACK)) {
            if (index < 0)
                index = flow_insert(t, key, hash, slot);
            else
                flow_touch(t, index);
            struct flow *f = &t->flows[index];
            if (f->stage == STAGE_NONE || f->client_isn != seq) {
                flow_reset(f);
                f->stage = STAGE_SYN;
                f->client_isn = seq;
                f->started[0] = 1;
                f->high[0] = seq + 1;
            }
        } else if (d == 1 && (flags & TCP_ACK) && index >= 0) {
            flow_touch(t, index);
            struct flow *f = &t->flows[index];
            if (f->stage != STAGE_NONE && ack == f->client_isn + 1) {
                f->stage = STAGE_SYN_ACK;
                f->server_isn = seq;
                f->synack_time = time;
                f->started[1] = 1;
                f->high[1] = seq + 1;
                f->hole_count[1] = 0;
            }
        }
        return 0;
    }
    int found = index >= 0;
    if (!found) {
        if (payload == 0)
            return 0;
        index = flow_insert(t, key, hash, slot);
    } else {
        flow_touch(t, index);
    }
    struct flow *f = &t->flows[index];
    if (found && f->stage == STAGE_SYN_ACK && d == 0 && (flags & TCP_ACK) && ack == f->server_isn + 1) {
        f->stage = STAGE_NONE;
        events = EVENT_HANDSHAKE;
        if (time != NO_TIME && f->synack_time != NO_TIME) {
            int64_t elapsed = time - f->synack_time;
            *rtt = elapsed > 0 ? elapsed : 0;
            events |= EVENT_RTT;
        }
    }
    if (payload > 0)
        events |= segment(f, d, seq, payload);
    return events;
}

/* The size of a flow record, for the owner's allocation. */
long tcp_flow_size(void) { return (long)sizeof(struct flow); }

/* The IP frames of one family of a batch, as exporter/headers.py found them (IPFrames), with each
 * frame's direction, client row (-1: not counted) and protocol label from the engine. */
struct tcp_family {
    long count;
    int64_t family;
    const int64_t *index, *protocol, *sport, *dport, *network, *transport, *row;
    const uint64_t *src_hi, *src_lo, *dst_hi, *dst_lo;
    const uint8_t *inbound, *label;
    uint8_t *events;  /* out, per frame */
    int64_t *rtt;     /* out, per frame with EVENT_RTT */
};

/* The batch: its buffer and frames, times (seconds; NaN unknown; NULL: none), and where the sums
 * go: sums[row * width + column], columns as exporter/tcpflows.py's TcpColumns. */
struct tcp_batch {
    const uint8_t *buffer;
    const int64_t *starts, *wire_lengths;
    const double *times;
    int64_t *sums;
    int64_t width, handshakes, rtt_buckets, rtt_sum, segments, retransmitted, resets, bound_count;
    const int64_t *bounds;  /* ns, ascending */
};

static inline uint32_t be32(const uint8_t *at) { return (uint32_t)at[0] << 24 | at[1] << 16 | at[2] << 8 | at[3]; }
static inline uint32_t be16(const uint8_t *at) { return (uint32_t)at[0] << 8 | at[1]; }

/* The flow key of frame i, in direction d. */
static inline void frame_key(const struct tcp_family *in, long i, uint8_t d, uint64_t *key) {
    uint64_t sport = (uint64_t)in->sport[i] & 0xFFFF, dport = (uint64_t)in->dport[i] & 0xFFFF;
    if (d == 0) {
        key[0] = in->src_hi[i]; key[1] = in->src_lo[i]; key[2] = in->dst_hi[i]; key[3] = in->dst_lo[i];
        key[4] = (uint64_t)in->family << 32 | sport << 16 | dport;
    } else {
        key[0] = in->dst_hi[i]; key[1] = in->dst_lo[i]; key[2] = in->src_hi[i]; key[3] = in->src_lo[i];
        key[4] = (uint64_t)in->family << 32 | dport << 16 | sport;
    }
}

/* What the first pass reads of a frame's headers. */
struct segment_fields {
    uint32_t seq, ack, payload, hash;  /* hash: of the flow key, for KIND_TRACK */
    uint8_t flags, direction, kind;
};
#define KIND_SKIP 0   /* not counted, not TCP, or not a whole segment */
#define KIND_RESET 1
#define KIND_PASS 2   /* counted TCP that cannot change a flow: an ACK out, a SYN of another kind */
#define KIND_TRACK 3

/* First pass over one family: the header fields of every frame. Its loads do not depend on each
 * other, so the processor overlaps their cache misses (a batch's frames are larger than the caches). */
static void read_segments(const struct tcp_batch *b, const struct tcp_family *in, struct segment_fields *out) {
    for (long i = 0; i < in->count; i++) {
        out[i].kind = KIND_SKIP;
        if (in->row[i] < 0 || in->protocol[i] != 6 || in->sport[i] < 0)
            continue;
        int64_t frame = in->index[i], network = in->network[i], transport = in->transport[i];
        const uint8_t *ip = b->buffer + network, *tcp = b->buffer + transport;
        int64_t data_offset = (tcp[12] >> 4) * 4, ip_end;
        if (in->family == 4) {
            uint32_t stated = be16(ip + 2);
            if (ip[6] & 0x20)  /* more fragments: only a part of the segment */
                continue;
            ip_end = stated ? network + stated : b->starts[frame] + b->wire_lengths[frame];
        } else {
            uint32_t stated = be16(ip + 4);
            ip_end = stated ? network + 40 + stated : b->starts[frame] + b->wire_lengths[frame];
        }
        if (data_offset < 20)
            continue;
        int64_t payload = ip_end - transport - data_offset;
        uint8_t flags = tcp[13], d = in->inbound[i] ? 0 : 1;
        out[i].payload = payload > 0 ? (uint32_t)payload : 0;
        out[i].flags = flags;
        out[i].direction = d;
        out[i].seq = be32(tcp + 4);
        out[i].ack = be32(tcp + 8);
        if (flags & TCP_RST) {
            out[i].kind = KIND_RESET;
        } else if ((flags & TCP_SYN) ? (d == 0) != ((flags & TCP_ACK) != 0)
                                     : payload > 0 || (d == 0 && (flags & TCP_ACK))) {
            uint64_t key[5];
            frame_key(in, i, d, key);
            out[i].hash = flow_hash(key);
            out[i].kind = KIND_TRACK;
        } else {
            out[i].kind = KIND_PASS;
        }
    }
}

/* Second pass, frame i of one family: its flow's state, its events, and the sums. */
static void track_one(struct flow_table *t, const struct tcp_batch *b, struct tcp_family *in, long i,
                      const struct segment_fields *fields) {
    in->events[i] = 0;
    if (fields->kind == KIND_RESET) {
        b->sums[in->row[i] * b->width + b->resets + fields->direction]++;
        in->events[i] = EVENT_RESET;
        return;
    }
    if (fields->kind != KIND_TRACK)
        return;
    uint8_t d = fields->direction;
    int64_t *sums = b->sums + in->row[i] * b->width, frame = in->index[i];
    uint64_t key[5];
    frame_key(in, i, d, key);
    int64_t time = NO_TIME;
    if (b->times != NULL && b->times[frame] == b->times[frame])  /* not NaN */
        time = (int64_t)(b->times[frame] * 1e6 + 0.5) * 1000;  /* to the microsecond (see tcpflows.py) */
    int64_t rtt = 0;
    uint8_t events = track_frame(t, key, fields->hash, d, fields->flags, fields->seq, fields->ack, fields->payload,
                                 time, &rtt);
    in->events[i] = events;
    if (events & EVENT_SEGMENT)
        sums[b->segments + d]++;
    if (events & EVENT_RETRANSMISSION)
        sums[b->retransmitted + d]++;
    if (events & EVENT_HANDSHAKE)
        sums[b->handshakes + in->label[i]]++;
    if (events & EVENT_RTT) {
        int64_t bucket = 0;
        while (bucket < b->bound_count && rtt > b->bounds[bucket])
            bucket++;
        sums[b->rtt_buckets + bucket]++;
        sums[b->rtt_sum] += rtt;
        in->rtt[i] = rtt;
    }
}

/* Track the TCP frames of both families in capture order (by frame index) and add their events to
 * the batch's sums. `scratch` has room for both families' frames (tcp_scratch_size() bytes each). */
void tcp_track(struct flow_table *t, const struct tcp_batch *b, struct tcp_family *v4, struct tcp_family *v6,
               struct segment_fields *scratch) {
    struct segment_fields *f4 = scratch, *f6 = scratch + v4->count;
    read_segments(b, v4, f4);
    read_segments(b, v6, f6);
    long i4 = 0, i6 = 0;
    while (i4 < v4->count || i6 < v6->count) {
        if (i6 >= v6->count || (i4 < v4->count && v4->index[i4] < v6->index[i6])) {
            track_one(t, b, v4, i4, &f4[i4]);
            i4++;
        } else {
            track_one(t, b, v6, i6, &f6[i6]);
            i6++;
        }
    }
}

/* The size of tcp_track's scratch record per frame. */
long tcp_scratch_size(void) { return (long)sizeof(struct segment_fields); }
