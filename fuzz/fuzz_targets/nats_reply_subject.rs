//! The reply subject of a JetStream message, which the server sends and the nats interface reads
//! for each message's stream sequence and delivery count (`reply_delivery`). The input is taken
//! as a subject as it is and, to reach the accepted forms often, as pieces joined by dots after
//! `$JS.ACK.`. Properties: the reading agrees with a plain second reading written for clarity
//! (split on every dot, count the tokens, parse the two numbers of the form that count names,
//! digits only);
//! it never panics; a number it returns is the text of the token it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rustomnic_fuzz::Choices;
use rustomnic_nats::reply_delivery;

/// The same reading, the long way round.
fn plain(reply: &str) -> Option<(u64, i64)> {
    let tokens: Vec<&str> = reply.split('.').collect();
    if tokens.len() < 2 || tokens[0] != "$JS" || tokens[1] != "ACK" {
        return None;
    }
    let after = &tokens[2..];
    let (delivered, sequence) = if after.len() == 7 {
        (after[2], after[3])
    } else if after.len() >= 9 {
        (after[4], after[5])
    } else {
        return None;
    };
    // Digits only: `parse` alone would also take a leading '+'.
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(sequence) || !digits(delivered) {
        return None;
    }
    let sequence: u64 = sequence.parse().ok()?;
    let delivered: u64 = delivered.parse().ok()?;
    Some((sequence, i64::try_from(delivered).ok()?))
}

fn check(reply: &str) {
    let got = reply_delivery(reply);
    assert_eq!(got, plain(reply), "two readings of {reply:?} disagree");
    if let Some((sequence, delivered)) = got {
        assert!(reply.split('.').any(|t| t.parse::<u64>() == Ok(sequence)), "{sequence} is not a token of {reply:?}");
        assert!(delivered >= 0, "a negative delivery count from {reply:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    check(&String::from_utf8_lossy(data));
    let mut c = Choices::new(data);
    let n = 6 + c.byte() % 6;
    let pieces: Vec<String> = (0..n)
        .map(|_| match c.byte() % 3 {
            0 => c.u64().to_string(),
            1 => (c.byte() % 4).to_string(),
            _ => String::from_utf8_lossy(c.piece()).into_owned(),
        })
        .collect();
    check(&format!("$JS.ACK.{}", pieces.join(".")));
});
