/* The wire and limit constants of afunix, written once for C: here.
 *
 * src/afunix/_limits.py writes the same numbers once for Python, without
 * the AFUNIX_ prefix.  csrc/build.py reads that file and defines
 * AFUNIX_EXPECT_<NAME> for each number and AFUNIX_LIMITS_EXPECTED; the
 * checks below then stop the build when the two disagree (C99 has no
 * _Static_assert: #error does it in the preprocessor).  A name checked here
 * but missing in Python is an undefined AFUNIX_EXPECT_<NAME>, which the
 * preprocessor reads as 0: the build stops too.
 */
#ifndef AFUNIX_LIMITS_H
#define AFUNIX_LIMITS_H

#define AFUNIX_MAX_BATCH 1024   /* UIO_MAXIOV: most messages per call */
#define AFUNIX_SCM_MAX_FD 253   /* most descriptors per SCM_RIGHTS message */
#define AFUNIX_ADDR_MAX 108     /* bytes of sun_path we keep per address */
#define AFUNIX_FRAME_HEADER 8   /* bytes of a channel frame header (docs/PROTOCOL.md) */
#define AFUNIX_FRAME_VERSION 1  /* the frame version this core writes and reads */
#define AFUNIX_FRAME_MAGIC 0xAF /* last header byte of every frame */
#define AFUNIX_RECORD_MAX 65536 /* most bytes of one SOCK_SEQPACKET record of a channel */

#ifdef AFUNIX_LIMITS_EXPECTED
#if AFUNIX_MAX_BATCH != AFUNIX_EXPECT_MAX_BATCH
#error "AFUNIX_MAX_BATCH differs from MAX_BATCH in src/afunix/_limits.py"
#endif
#if AFUNIX_SCM_MAX_FD != AFUNIX_EXPECT_SCM_MAX_FD
#error "AFUNIX_SCM_MAX_FD differs from SCM_MAX_FD in src/afunix/_limits.py"
#endif
#if AFUNIX_ADDR_MAX != AFUNIX_EXPECT_ADDR_MAX
#error "AFUNIX_ADDR_MAX differs from ADDR_MAX in src/afunix/_limits.py"
#endif
#if AFUNIX_FRAME_HEADER != AFUNIX_EXPECT_FRAME_HEADER
#error "AFUNIX_FRAME_HEADER differs from FRAME_HEADER in src/afunix/_limits.py"
#endif
#if AFUNIX_FRAME_VERSION != AFUNIX_EXPECT_FRAME_VERSION
#error "AFUNIX_FRAME_VERSION differs from FRAME_VERSION in src/afunix/_limits.py"
#endif
#if AFUNIX_FRAME_MAGIC != AFUNIX_EXPECT_FRAME_MAGIC
#error "AFUNIX_FRAME_MAGIC differs from FRAME_MAGIC in src/afunix/_limits.py"
#endif
#if AFUNIX_RECORD_MAX != AFUNIX_EXPECT_RECORD_MAX
#error "AFUNIX_RECORD_MAX differs from RECORD_MAX in src/afunix/_limits.py"
#endif
#endif

#endif
