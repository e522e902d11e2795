//! The queue of write-through prepares waiting for one key: when a
//! `Prepare` meets another transaction's pending change of the key and its
//! request allows a wait (`PrepareRequest.wait_ms`), it takes a place here
//! and is woken, in arrival order, once the key is free again (the change
//! committed, aborted or timed out). The woken prepare then has the key's
//! *turn*: it runs before any prepare that arrived after it.
//!
//! One queue lives in each key's record in the store, under the record's
//! lock, so that joining the queue and the change settling cannot miss
//! each other. Nothing here blocks or awaits: a waiter holds only the
//! receiving end of a oneshot channel, and waits for it outside every lock.
//!
//! Invariant kept by [`PrepareQueue::kick`], which the store runs after
//! every change of a record: when no change is pending and no waiter has
//! the turn, the queue is empty, or its first waiter has just been given
//! the turn.

use std::collections::VecDeque;

use tokio::sync::oneshot;

/// Identifies one waiting prepare (one `Prepare` request) in its key's
/// queue; unique per keyspace.
pub type Ticket = u64;

/// The waiting prepares of one key, first come first served.
#[derive(Debug, Default)]
pub struct PrepareQueue {
    /// In arrival order; each is told through its channel when its turn
    /// comes.
    waiting: VecDeque<(Ticket, oneshot::Sender<()>)>,
    /// The waiter that was woken and has not yet run its prepare again.
    turn: Option<Ticket>,
}

/// What [`PrepareQueue::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    /// Run the prepare now.
    Go,
    /// Wait for the turn (the key is pending, or others are ahead).
    Wait,
}

impl PrepareQueue {
    /// True when nobody waits and nobody has the turn.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty() && self.turn.is_none()
    }

    /// How many prepares wait (not counting one that has the turn).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether the prepare holding `ticket` may run now, given whether
    /// another change of the key is `pending`. A waiter that was given the
    /// turn always may (it uses the turn up); otherwise one may run only
    /// when nothing is pending, nobody else has the turn and nobody waits
    /// ahead of it. A waiter admitted from the head of the queue leaves it.
    pub fn admit(&mut self, ticket: Ticket, pending: bool) -> Admission {
        if self.turn == Some(ticket) {
            self.turn = None;
            return Admission::Go;
        }
        if pending || self.turn.is_some() {
            return Admission::Wait;
        }
        match self.waiting.front() {
            None => Admission::Go,
            Some((first, _)) if *first == ticket => {
                self.waiting.pop_front();
                Admission::Go
            }
            Some(_) => Admission::Wait,
        }
    }

    /// Puts `ticket` in the queue (at the back, or at the `front` for a
    /// waiter whose turn was taken by a prepare that did not queue), and
    /// returns the receiver that is told when its turn comes; `None` when
    /// `ticket` is already waiting (its first receiver stays valid).
    pub fn join(&mut self, ticket: Ticket, front: bool) -> Option<oneshot::Receiver<()>> {
        if self.waiting.iter().any(|(t, _)| *t == ticket) {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        if front {
            self.waiting.push_front((ticket, tx));
        } else {
            self.waiting.push_back((ticket, tx));
        }
        Some(rx)
    }

    /// `ticket` gives up (its wait ran out, or its request was dropped): it
    /// leaves the queue, and a turn it was given goes back (to the next
    /// waiter, at the next [`kick`](PrepareQueue::kick)).
    pub fn leave(&mut self, ticket: Ticket) {
        self.waiting.retain(|(t, _)| *t != ticket);
        if self.turn == Some(ticket) {
            self.turn = None;
        }
    }

    /// When nothing is `pending` and nobody has the turn, gives it to the
    /// first waiter still listening, and wakes it.
    pub fn kick(&mut self, pending: bool) {
        if pending || self.turn.is_some() {
            return;
        }
        while let Some((ticket, tx)) = self.waiting.pop_front() {
            if tx.send(()).is_ok() {
                self.turn = Some(ticket);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn woken(rx: &mut oneshot::Receiver<()>) -> bool {
        rx.try_recv().is_ok()
    }

    #[test]
    fn a_free_key_admits_a_newcomer_and_a_pending_one_makes_it_wait() {
        let mut q = PrepareQueue::default();
        assert_eq!(q.admit(1, false), Admission::Go);
        assert_eq!(q.admit(2, true), Admission::Wait);
        assert!(q.is_empty(), "admit alone never queues");
    }

    #[test]
    fn waiters_are_woken_one_at_a_time_in_arrival_order() {
        let mut q = PrepareQueue::default();
        let mut rx: Vec<_> = (1..=3).map(|t| q.join(t, false).unwrap()).collect();
        q.kick(true);
        assert!(
            rx.iter_mut().all(|rx| !woken(rx)),
            "nothing wakes while pending"
        );
        // The change settles: the first waiter gets the turn, the others wait.
        q.kick(false);
        assert!(woken(&mut rx[0]));
        assert!(!woken(&mut rx[1]) && !woken(&mut rx[2]));
        // A newcomer and a later waiter cannot take the first one's turn.
        assert_eq!(q.admit(9, false), Admission::Wait);
        assert_eq!(q.admit(3, false), Admission::Wait);
        assert_eq!(q.admit(1, false), Admission::Go);
        // It prepared: nobody wakes until its change settles.
        q.kick(true);
        assert!(!woken(&mut rx[1]));
        q.kick(false);
        assert!(woken(&mut rx[1]));
        assert!(!woken(&mut rx[2]));
        assert_eq!(q.admit(2, false), Admission::Go);
        q.kick(false); // 2 was refused by version: the key is free again
        assert!(woken(&mut rx[2]));
        assert_eq!(q.admit(3, false), Admission::Go);
        q.kick(false);
        assert!(q.is_empty());
        assert_eq!(q.admit(9, false), Admission::Go);
    }

    #[test]
    fn a_waiter_that_leaves_passes_its_turn_on() {
        let mut q = PrepareQueue::default();
        let mut a = q.join(1, false).unwrap();
        let mut b = q.join(2, false).unwrap();
        let mut c = q.join(3, false).unwrap();
        q.leave(2);
        q.kick(false);
        assert!(woken(&mut a));
        // 1 gives up with the turn in hand: 3 is next, 2 is gone.
        q.leave(1);
        q.kick(false);
        assert!(woken(&mut c));
        assert!(b.try_recv().is_err());
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_dropped_receiver_is_skipped() {
        let mut q = PrepareQueue::default();
        drop(q.join(1, false).unwrap());
        let mut b = q.join(2, false).unwrap();
        q.kick(false);
        assert!(woken(&mut b));
        assert_eq!(q.admit(2, false), Admission::Go);
        assert!(q.is_empty());
    }

    #[test]
    fn a_waiter_whose_turn_was_taken_goes_back_to_the_front() {
        let mut q = PrepareQueue::default();
        let mut a = q.join(1, false).unwrap();
        let mut b = q.join(2, false).unwrap();
        q.kick(false);
        assert!(woken(&mut a));
        // A prepare that does not queue took the key meanwhile.
        assert_eq!(q.admit(1, true), Admission::Go);
        let mut a = q.join(1, true).expect("a new receiver");
        assert!(q.join(1, true).is_none(), "joining twice keeps one place");
        q.kick(false);
        assert!(woken(&mut a));
        assert!(!woken(&mut b));
    }

    #[test]
    fn the_head_may_run_once_the_change_timed_out_before_any_kick() {
        let mut q = PrepareQueue::default();
        let _a = q.join(1, false).unwrap();
        let _b = q.join(2, false).unwrap();
        // The store timed the change out inside this very prepare.
        assert_eq!(q.admit(2, false), Admission::Wait);
        assert_eq!(q.admit(1, false), Admission::Go);
        assert_eq!(q.len(), 1);
    }
}
