//! Any bytes given to the envelope parser: an error or an envelope, never a panic or a hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let strict = domain::Envelope::parse(data);
    let logged = domain::Envelope::parse_logged(data);
    // What ingest accepts, the log reader reads back the same way.
    if let Ok(envelope) = strict {
        assert_eq!(logged.as_ref().ok(), Some(&envelope));
    }
});
