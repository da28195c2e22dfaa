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
