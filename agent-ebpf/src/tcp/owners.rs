//! Which tracked process owns each socket: a table of buckets of `SOCK_WAYS` slots in an array
//! map, indexed by a hash of the socket's address, with a hash map for the sockets whose bucket
//! was full. The loader sizes both (`SockTable`, `[tcp] max_sockets`).
//!
//! A connection of a target claims a slot twice and releases it twice (its connect or accept,
//! and its close, on each end). In a hash map each of those is a helper call that takes a bucket
//! lock and a free list: about 200-300 ns apiece, most of `inet_sock_set_state`'s run
//! (docs/benchmarks.md, "Where the TCP programs' time goes"). Here a look-up is an inlined array
//! look-up and two compares, a claim or a release one compare-and-swap.
//!
//! Only a socket's own state changes claim, write and release its slot, and the kernel runs them
//! one at a time under the socket's lock; other sockets only read a slot's address, or claim it
//! from 0. So a reader that finds its socket's address in a slot reads that socket's owner.
use agent_common::{
    lost,
    tcp::{SOCKETS_DEFAULT, SockBucket, SockOwner, SockSlot, SockTable, sock_bucket},
};
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    macros::map,
    maps::{Array, HashMap},
};

use crate::{
    aggregate::{atomic_add, compare_exchange},
    lost::count as count_lost,
};

const DEFAULT: SockTable = SockTable::for_sockets(SOCKETS_DEFAULT);

/// `log2` of `SOCK_OWNERS`' entries, set by the loader.
#[unsafe(no_mangle)]
static TCP_SOCK_BUCKET_BITS: u32 = DEFAULT.bucket_bits;

#[map]
static SOCK_OWNERS: Array<SockBucket> = Array::with_max_entries(DEFAULT.buckets(), 0);

/// Sockets whose bucket was full when they were claimed.
#[map]
static SOCK_SPILL: HashMap<u64, SockOwner> = HashMap::with_max_entries(DEFAULT.spill, 0);

/// How many entries `SOCK_SPILL` holds: while none, a socket not in its bucket has no owner and
/// no hash look-up is made (most sockets of a node are not a target's).
#[map]
static SOCK_SPILLED: Array<u64> = Array::with_max_entries(1, 0);

#[inline(always)]
fn bucket(sk: u64) -> Option<&'static mut SockBucket> {
    // SAFETY: volatile read of a loader-set global.
    let bits = unsafe { core::ptr::read_volatile(&TCP_SOCK_BUCKET_BITS) };
    SOCK_OWNERS
        .get_ptr_mut(sock_bucket(sk, bits))
        // SAFETY: a live map value; see the module's comment for who writes which slot.
        .map(|p| unsafe { &mut *p })
}

/// The slot holding `sk`, if its bucket does.
#[inline(always)]
fn slot_of(bucket: &mut SockBucket, sk: u64) -> Option<&mut SockSlot> {
    bucket
        .slots
        .iter_mut()
        // SAFETY: a live map value's field; other CPUs may claim or release it meanwhile.
        .find(|s| unsafe { core::ptr::read_volatile(&s.sk) } == sk)
}

/// `SOCK_SPILL`'s entry count, when it is not empty.
#[inline(always)]
fn spilled() -> Option<*mut u64> {
    let n = SOCK_SPILLED.get_ptr_mut(0)?;
    // SAFETY: a live map value.
    (unsafe { core::ptr::read_volatile(n) } != 0).then_some(n)
}

/// The owner of `sk`, in place: the socket's own state changes may update it.
#[inline(always)]
pub fn get_ptr_mut(sk: u64) -> Option<*mut SockOwner> {
    if sk == 0 {
        return None;
    }
    if let Some(s) = bucket(sk).and_then(|b| slot_of(b, sk)) {
        return Some(&mut s.owner);
    }
    spilled()?;
    SOCK_SPILL.get_ptr_mut(&sk)
}

/// The owner of `sk`, copied out.
#[inline(always)]
pub fn get(sk: u64) -> Option<SockOwner> {
    // SAFETY: a live map value, copied at once.
    get_ptr_mut(sk).map(|p| unsafe { *p })
}

/// Makes `owner` the owner of `sk`, replacing any owner it had (a socket whose close was not
/// seen, at the same address). Counted as lost when neither its bucket nor the spill map has
/// room.
#[inline(always)]
pub fn set(sk: u64, owner: &SockOwner) {
    if sk == 0 {
        return;
    }
    let Some(b) = bucket(sk) else {
        return;
    };
    if let Some(s) = slot_of(b, sk) {
        s.owner = *owner;
        return;
    }
    if let Some(p) = spilled().and_then(|_| SOCK_SPILL.get_ptr_mut(&sk)) {
        // SAFETY: a live map value of this socket's.
        unsafe { *p = *owner };
        return;
    }
    for s in b.slots.iter_mut() {
        // SAFETY: a live map value's field; the compare-and-swap settles a race with another
        // socket for the same free slot.
        if unsafe { core::ptr::read_volatile(&s.sk) } == 0
            && unsafe { compare_exchange(&mut s.sk, 0, sk) } == 0
        {
            s.owner = *owner;
            return;
        }
    }
    if SOCK_SPILL
        .insert(&sk, owner, u64::from(BPF_NOEXIST))
        .is_err()
    {
        count_lost(lost::TCP_SOCKETS_FULL);
        return;
    }
    if let Some(n) = SOCK_SPILLED.get_ptr_mut(0) {
        // SAFETY: a live map value, shared by all CPUs.
        unsafe { atomic_add(n, 1) };
    }
}

/// Forgets `sk`'s owner, returning it.
#[inline(always)]
pub fn take(sk: u64) -> Option<SockOwner> {
    if sk == 0 {
        return None;
    }
    if let Some(s) = bucket(sk).and_then(|b| slot_of(b, sk)) {
        let owner = s.owner;
        // SAFETY: a live map value's field. A compare-and-swap, not a store, so that the owner is
        // read before another socket can claim the slot, on any CPU's memory ordering.
        unsafe { compare_exchange(&mut s.sk, sk, 0) };
        return Some(owner);
    }
    let n = spilled()?;
    // SAFETY: copied out before removal.
    let owner = unsafe { SOCK_SPILL.get(&sk).copied() }?;
    if SOCK_SPILL.remove(&sk).is_ok() {
        // SAFETY: a live map value, shared by all CPUs.
        unsafe { atomic_add(n, u64::MAX) };
    }
    Some(owner)
}
