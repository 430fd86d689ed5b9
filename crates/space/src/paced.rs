//! Asserting many records over a run of turns instead of in one: whatever a turn asserts
//! leaves the actor when the turn ends, and the dataspace and its observers take in one
//! turn's assertions as a whole. A frontend demanding 100,000 steps in one turn would have
//! the planner see none of them until the dataspace had taken in them all.

use std::sync::Arc;

use preserves_schema::support::Unparse;
use syndicate::actor::{Account, Activation, AnyValue, Cap};

/// How many records [`assert_in_turns`] asserts per turn: few enough that the dataspace
/// takes one turn's in a few milliseconds (a worker's report waits behind at most one such
/// turn), enough that the turns themselves cost little (`nixspace bench dispatch`: 250
/// gave the first assignment after 100,000 demands in 17–28 ms instead of 101–145 ms with
/// 2,000, and as many steps per second or more).
pub const RECORDS_PER_TURN: usize = 250;

/// Assert `records` at `ds`, in order, [`RECORDS_PER_TURN`] in this turn and as many in each
/// turn that follows, until all are asserted. The later turns are charged to an account of
/// their own (not the one of the turn that started it, which may be a connection's input
/// loop). The assertions belong to the active facet (withdrawn when it stops; the records it
/// has not reached by then are not asserted).
pub fn assert_in_turns<R>(t: &mut Activation, ds: Arc<Cap>, mut records: std::vec::IntoIter<R>)
where
    R: Unparse<Arc<Cap>> + Send + 'static,
{
    for record in records.by_ref().take(RECORDS_PER_TURN) {
        ds.assert(t, &record);
    }
    if records.len() == 0 {
        return;
    }
    let facet = t.facet_ref();
    let account = Account::new(Some(AnyValue::symbol("paced-assertions")), None);
    tokio::spawn(async move {
        account.ensure_clear_funds().await;
        let again = Arc::clone(&account);
        facet.activate(&again, None, move |t| {
            assert_in_turns(t, ds, records);
            Ok(())
        });
    });
}
